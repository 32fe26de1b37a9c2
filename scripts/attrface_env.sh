# Environment for AttrFace commands; sourced by .venv/bin/activate (scripts/setup.sh adds the line) and by make.
# It lets the bare Dagster commands users know find this project's definitions:
#   dagster job execute -j build_dataset        (no -m needed)
# Dagster's CLI reads any option from DAGSTER_CLI_<COMMAND>_<OPTION>; an explicit -m/-f/-w on the command line wins.
_attrface_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export DAGSTER_HOME="${DAGSTER_HOME:-$_attrface_root/dagster_home}"
for _attrface_cmd in JOB_EXECUTE JOB_LAUNCH JOB_LIST JOB_PRINT JOB_BACKFILL ASSET_MATERIALIZE ASSET_LIST; do
    export "DAGSTER_CLI_${_attrface_cmd}_MODULE_NAME=attrface_pipeline.definitions"
done
unset _attrface_root _attrface_cmd
