import subprocess
import sys


def test_import_federation_loads_neither_torch_nor_grpc():
    code = (
        "import sys, loraflight, loraflight.federation\n"
        "bad = [m for m in ('torch', 'grpc') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "from loraflight.federation import Client, Store, CardServer, SyncPolicy, sync, plan_sync\n"
        "import loraflight.federation.cli.net_cmds, loraflight.federation.node, loraflight.testing\n"
        "bad = [m for m in ('torch', 'grpc') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert callable(loraflight.federation.sync)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_py_typed_present():
    from pathlib import Path

    import loraflight.federation

    assert (Path(loraflight.federation.__file__).parent / "py.typed").exists()
