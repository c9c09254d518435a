"""pytest's root configuration: modules whose optional dependency is missing are not collected for doctests.

`python -m pytest` collects `lightning_sparse` with `--doctest-modules`, which imports every module; the Hugging Face
integration imports `transformers` at import time (the `[hf]` extra), so without it that module is skipped here, like
the tests that need it (`pytest.importorskip`), instead of failing the whole run at collection.
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("transformers") is None:
    collect_ignore.append("lightning_sparse/integrations/transformers.py")
