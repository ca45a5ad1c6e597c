"""The test suite (also importable as a package, e.g. `python -m tests.golden_outputs`)."""
import os
import sys
from pathlib import Path

# The repository root holds the folders engine/ and kernels/, which install as weightstream.engine
# and weightstream.kernels. First on sys.path (where `python -m pytest` and pytest's rootdir
# insertion put it), the root would make them importable as top-level `engine` and `kernels`,
# shadowing installed packages of those names: Hugging Face's `kernels`, which transformers
# imports. The tests use the project only as `weightstream`, so the root goes to the end of the
# path, where it still supplies the `tests` package and nothing installed is hidden by it
# (pyproject.toml's --import-mode=append keeps pytest from putting it back in front).
_ROOT = str(Path(__file__).resolve().parents[1])
_at_root = [p for p in sys.path if os.path.abspath(p or ".") == _ROOT]
sys.path[:] = [p for p in sys.path if p not in _at_root] + [_ROOT]
if "kernels" in sys.modules and os.path.dirname(getattr(sys.modules["kernels"], "__file__", "") or "") \
        == os.path.join(_ROOT, "kernels"):
    raise RuntimeError("the repository's kernels/ folder was imported as a top-level `kernels` before "
                       "the tests started; import it as weightstream.kernels")
