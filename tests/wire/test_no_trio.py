"""The wire modules are sans-IO: they import and work without trio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "conec_trio"

# The package __init__ may import trio, so a stub package stands in for it and only the
# submodules under test are really imported.
SCRIPT = """
import sys, types

sys.modules["trio"] = None  # makes any "import trio" fail
try:
    import trio
except ImportError:
    pass
else:
    raise SystemExit("blocking trio did not work")

package = types.ModuleType("conec_trio")
package.__path__ = [sys.argv[1]]
sys.modules["conec_trio"] = package

import conec_trio._wire
from conec_trio._wire import control, framing

decoder = framing.FrameDecoder(100)
decoder.feed(framing.encode_frame(control.encode(control.OpenDirect(5))))
assert control.decode(decoder.next_message()) == control.OpenDirect(5)
assert sys.modules["trio"] is None
print("ok")
"""


def test_wire_imports_without_trio() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(PACKAGE_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
