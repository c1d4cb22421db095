"""The tokenizer stage imports no torch (its behaviour against transformers is in test_stages.py)."""

import subprocess
import sys

CHECK = """
import sys
import pyarrow as pa
from pipeline.tokenize import Tokenize
out = Tokenize({model!r})(pa.table({{"id": [1], "text": ["A fine film."]}}))
assert out["input_tokens"][0].as_py() > 2
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""


def test_tokenizer_stage_imports_no_torch(checkpoints):
    """What a tokenizer actor imports, in a fresh interpreter: it tokenizes, and torch never loads."""
    out = subprocess.run([sys.executable, "-c", CHECK.format(model=str(checkpoints["classifier"]))],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"
