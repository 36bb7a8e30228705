# checkov loads every module in this directory with --external-checks-dir.
from os.path import basename, dirname, isfile, join
import glob

modules = glob.glob(join(dirname(__file__), "*.py"))
__all__ = [basename(f)[:-3] for f in modules if isfile(f) and not f.endswith("__init__.py")]
