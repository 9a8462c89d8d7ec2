"""How much memory a process may use: the machine's MemAvailable, the room under RLIMIT_AS
(ulimit -v) and the room its control group leaves, the least of them; and what happens when an
input needs more than that (one error naming the bytes, never a MemoryError traceback)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llama_np.weights import memory

PROMPT = "ROMEO. " * 1200  # about 6,000 tokens: ~3.5 GiB of attention arrays in the bundled model


def run_python(code: str, *args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, under an address-space limit if given."""
    prelude = ""
    if limit_bytes is not None:
        prelude = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=300)


def test_under_an_address_space_limit_the_available_memory_is_what_the_limit_leaves():
    limit = 4 * 1024**3
    result = run_python("""
        from llama_np.weights import memory
        print(memory.available_memory(), memory.address_space_room(), memory.machine_available())
        """, limit_bytes=limit)
    assert result.returncode == 0, result.stderr
    available, room, machine = map(int, result.stdout.split())
    assert 0 < room < limit and available == min(room, machine)


def test_a_cgroup_limit_anywhere_above_the_process_bounds_the_available_memory(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    group = root / "memory" / "docker" / "abc"
    group.mkdir(parents=True)
    (root / "memory" / "docker" / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
    (root / "memory" / "docker" / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    (group / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (group / "memory.usage_in_bytes").write_text("1000\n")
    unified = root / "unified" / "user.slice"
    unified.mkdir(parents=True)
    (unified / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup.txt"
    proc.write_text("4:memory:/docker/abc\n0::/user.slice\n")
    monkeypatch.setattr(memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(memory, "PROC_CGROUP", proc)
    assert memory.cgroup_room() == 2 * 2**30
    monkeypatch.setattr(memory, "machine_available", lambda: 16 * 2**30)
    monkeypatch.setattr(memory, "address_space_room", lambda: None)
    assert memory.available_memory() == 2 * 2**30
    (unified / "memory.max").write_text(f"{2**30}\n")
    (unified / "memory.current").write_text(f"{2**29}\n")
    assert memory.available_memory() == 2**29  # cgroup v2's limit is the tighter one now


def test_without_any_limit_the_cgroup_adds_nothing(tmp_path, monkeypatch):
    proc = tmp_path / "cgroup.txt"
    proc.write_text("0::/\n")
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(memory, "PROC_CGROUP", proc)
    assert memory.cgroup_room() is None


@pytest.mark.parametrize("verb", [["logits"], ["generate", "--max-new-tokens", "2"], ["dump", "--out", "{out}"],
                                  ["attention", "--layer", "0", "--out", "{out}.png"]])
def test_a_long_prompt_under_a_4_gib_limit_is_one_error_line_not_a_memory_error(verb, tmp_path):
    argv = [part.replace("{out}", str(tmp_path / "out.npz")) for part in verb] + ["-"]
    result = run_python("""
        import sys
        from llama_np.cli.main import main
        sys.stdin = open(sys.argv[1])
        sys.exit(main(sys.argv[2:]))
        """, str(_prompt_file(tmp_path)), *argv, limit_bytes=4 * 1024**3)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("llama-np: warning:")]
    assert len(errors) == 1 and errors[0].startswith("llama-np: error:"), result.stderr
    assert "GiB" in errors[0] and "available to this process" in errors[0]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out.npz*")), "nothing is written half"


def _prompt_file(directory: Path) -> Path:
    path = directory / "prompt.txt"
    path.write_text(PROMPT)
    return path
