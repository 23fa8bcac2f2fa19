"""tpu/ scripts: every gcloud command they would run, checked with --dry-run and against a stub gcloud on PATH."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POD = ROOT / "tpu" / "pod.py"
BASE = ["--name", "mj-v4", "--zone", "us-central2-b", "--project", "proj"]


@pytest.fixture
def stub_gcloud(tmp_path):
    """A fake gcloud that logs its argv and succeeds (or fails when the argv contains FAIL)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "gcloud.log"
    script = bindir / "gcloud"
    script.write_text(
        "#!/usr/bin/env python3\nimport sys, shlex\n"
        f"open({str(log)!r}, 'a').write(shlex.join(sys.argv[1:]) + '\\n')\n"
        "sys.exit(3 if any('FAIL' in a for a in sys.argv) else 0)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    return env, log


def _pod(*argv, env=None, check=True):
    return subprocess.run([sys.executable, str(POD), *argv], env=env, capture_output=True, text=True, check=check)


def _printed(out: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def test_create_dry_run_prints_and_runs_nothing(stub_gcloud):
    env, log = stub_gcloud
    r = _pod("create", *BASE, "--accelerator", "v4-32", "--spot", "--dry-run", env=env)
    (cmd,) = _printed(r.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mj-v4"]
    assert cmd[cmd.index("--accelerator-type") + 1] == "v4-32"
    assert cmd[cmd.index("--version") + 1] == "tpu-ubuntu2204-base"
    assert cmd[cmd.index("--zone") + 1] == "us-central2-b" and cmd[cmd.index("--project") + 1] == "proj"
    assert "--spot" in cmd and not log.exists()


@pytest.mark.parametrize("acc, version", [("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-64", "v2-alpha-tpuv5")])
def test_versions_per_generation(acc, version):
    (cmd,) = _printed(_pod("create", *BASE, "--accelerator", acc, "--dry-run").stdout)
    assert cmd[cmd.index("--version") + 1] == version
    r = _pod("create", *BASE, "--accelerator", "v9-8", "--dry-run", check=False)
    assert r.returncode != 0 and "v9-8" in r.stderr


def test_setup_copies_and_installs_on_all_workers():
    tar, scp, ssh = _printed(_pod("setup", *BASE, "--extras", "experiments", "--dry-run").stdout)
    assert tar[0] == "tar" and "--exclude=.git" in tar and tar[tar.index("-C") + 1] == str(ROOT)
    assert scp[4] == "scp" and "--worker=all" in scp and scp[-1] != "" and "mj-v4:~/mergejax.tar.gz" in scp
    assert ssh[4:6] == ["ssh", "mj-v4"] and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert "python3.11 -m venv .venv" in remote and ".[experiments]" in remote and "jax[tpu]==0.10.2" in remote


def test_run_quotes_the_command_for_every_worker():
    (ssh,) = _printed(_pod("run", *BASE, "--dry-run", "--", "python3", "tpu/merge_pod.py", "--out",
                           "gs://b/merged dir").stdout)
    assert "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert remote.startswith("cd ~/mergejax && export PATH=$HOME/mergejax/.venv/bin:$PATH && ")
    assert shlex.split(remote.split("&& ")[-1]) == ["python3", "tpu/merge_pod.py", "--out", "gs://b/merged dir"]


def test_copy_back_and_delete(tmp_path):
    mkdir, scp = _printed(_pod("copy-back", *BASE, "--remote", "results/x", "--local", str(tmp_path / "r"),
                               "--dry-run").stdout)
    assert mkdir == ["mkdir", "-p", str(tmp_path / "r")]
    assert "--recurse" in scp and "mj-v4:~/mergejax/results/x" in scp and "--worker=0" in scp
    (delete,) = _printed(_pod("delete", *BASE, "--dry-run").stdout)
    assert delete[4:6] == ["delete", "mj-v4"] and "--quiet" in delete


def test_session_runs_every_step_and_deletes_after_a_failure(stub_gcloud, tmp_path):
    env, log = stub_gcloud
    args = ["session", *BASE, "--accelerator", "v4-8", "--local", str(tmp_path / "res"), "--", "python3", "x.py"]
    printed = _printed(_pod(*args, env=env).stdout)
    actions = [c[4] for c in printed if c[0] == "gcloud"]
    assert actions == ["create", "scp", "ssh", "ssh", "scp", "delete"]
    ran = [shlex.split(line)[3] for line in log.read_text().splitlines()]
    assert ran == actions  # not a dry run: the stub saw exactly the printed commands
    log.unlink()
    r = _pod("session", *BASE, "--accelerator", "v4-8", "--local", str(tmp_path / "res"), "--", "FAIL", env=env,
             check=False)
    assert r.returncode == 3
    assert [shlex.split(line)[3] for line in log.read_text().splitlines()] == ["create", "scp", "ssh", "ssh", "delete"]


def test_launch_sh_dry_run(stub_gcloud):
    env, log = stub_gcloud
    r = subprocess.run(["bash", str(ROOT / "tpu" / "launch.sh"), "mj-v4", "us-central2-b", "python3 a.py --x 1",
                        "--setup", "--dry-run", "--project", "proj"], env=env, capture_output=True, text=True,
                       check=True)
    cmds = _printed(r.stdout)
    assert [c[4] if c[0] == "gcloud" else c[0] for c in cmds] == ["tar", "scp", "ssh", "ssh"]
    assert cmds[-1][cmds[-1].index("--command") + 1].endswith("bash -c 'python3 a.py --x 1'")
    assert not log.exists()
