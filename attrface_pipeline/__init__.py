"""AttrFace: the dataset factory (Dagster assets over framework-free stages) and its command line."""

import logging
import warnings


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# transformers says once per process that an image processor falls back to its PIL implementation because
# torchvision is absent. That is this project's supported setup (docs/configuration.md: torchvision has no CPU
# build here and is not a dependency); the PIL processors give the same arrays, so the line only adds noise.
logging.getLogger("transformers.utils.import_utils").addFilter(
    _DropMessage("requires torchvision (not installed); falling back to"))

# Dagster's own Pipes client reads a preview attribute of its message reader on every training run and warns about
# it; nothing in this project uses the preview API, so the line is not actionable here.
warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader\.expected_writer_count` is currently in "
                        r"preview")
