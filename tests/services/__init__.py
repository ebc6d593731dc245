"""In-process tests of the service layer: each test builds a real ``RegistryContext`` (migrated
database, local blob store, staging area) and calls the public service functions directly; jobs
run on the test's thread through the runner. No HTTP server, no subprocess, no broker, so a logic
bug surfaces in seconds.

    pytest tests/services                      # both backends (PostgreSQL half marked ``postgres``)
    pytest tests/services -m "not postgres"    # SQLite only
    pytest tests -m services                   # the same set, selected by its marker

The real-HTTP tests in ``tests/`` (a server subprocess, workers, a broker) stay: they are what
checks the protocol — status codes, streamed bodies, headers, the CLI and client, delivery through
Celery, crashes — which this layer never sees.
"""
