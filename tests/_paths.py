import os
from pathlib import Path

PERTURBQA = Path(os.environ.get("SYNTHPERT_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" /
                                "perturbqa"))
