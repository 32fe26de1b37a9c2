"""AttrFace: the dataset factory (Dagster assets over framework-free stages) and its command line."""

import logging


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
