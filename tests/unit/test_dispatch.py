"""A submit does not hang on a broker that is down or hung: the send gives up within the broker
timeout and the job is left for the reaper to re-send."""

from __future__ import annotations

import socket
import threading
import time

from app.queue import Dispatcher
from app.settings import Settings


def test_a_send_to_a_silent_broker_gives_up_within_the_timeout(tmp_path):
    with socket.socket() as silent:  # accepts TCP connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings = Settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                            broker_timeout_seconds=0.5)
        dispatcher = Dispatcher(settings, sessions=None)  # a failed send never reaches the database
        result = {}
        started = time.monotonic()
        sender = threading.Thread(target=lambda: result.update(sent=dispatcher.dispatch("job-id")), daemon=True)
        sender.start()
        sender.join(timeout=30)
        elapsed = time.monotonic() - started
    assert not sender.is_alive(), "the send hung on a silent broker"
    assert result == {"sent": False}
    print(f"send to a silent broker gave up after {elapsed:.2f} s")
    assert elapsed < 5
