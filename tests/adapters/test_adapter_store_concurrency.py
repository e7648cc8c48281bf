"""Concurrent registrations of one name get distinct, consecutive versions and corrupt nothing."""

import threading

from loraserve.adapters import AdapterStore

THREADS, EACH = 6, 4


def test_concurrent_registrations(tmp_path, spec, adapter_files, other_files):
    store = AdapterStore(tmp_path, spec)
    results, errors = [], []
    start = threading.Barrier(THREADS)

    def worker(i):
        start.wait()
        try:
            for j in range(EACH):
                files = adapter_files if (i + j) % 2 else other_files
                results.append(store.register_bytes("acme", "bot", *files))
                store.resolve("acme", "bot")  # readers run between the writers
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    versions = sorted(r.version for r in results)
    assert versions == list(range(1, THREADS * EACH + 1))
    reopened = AdapterStore(tmp_path, spec)
    assert [r.version for r in reopened.versions("acme", "bot")] == versions
    for record in reopened.versions("acme", "bot"):
        reopened.load(record)
    assert len({r.path for r in results}) == 2  # two distinct uploads, two blobs
