"""Ctrl-C during a stage run by a process pool: the run stops at once, and no task that was still
queued starts (a links task reads a whole monthly dump: minutes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time


def test_ctrl_c_with_workers_starts_no_queued_task(tmp_path):
    (tmp_path / "slowtask.py").write_text(textwrap.dedent("""
        import os, time
        def slow(folder, name):
            open(os.path.join(folder, "started-" + name), "w").close()
            time.sleep(6)
            return {"n": 1}
    """))
    script = textwrap.dedent("""
        import sys
        folder = sys.argv[1]
        sys.path.insert(0, folder)
        from slowtask import slow
        from gpt2kit.webtext.work import Runner, WorkFolder, run_tasks
        tasks = [(f"t{i}", (folder, f"t{i}")) for i in range(8)]
        try:
            run_tasks(WorkFolder(folder + "/work"), "stage", slow, tasks, Runner(workers=2))
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("started-*"))) < 2:  # both workers busy
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # the pool has queued the next task by now
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-t0", "started-t1"]
    assert took < 4, f"{took:.1f} s after Ctrl-C"
    assert "Traceback" not in err, err
