# mk/worker.mk: dspark-worker and its end-to-end tests.
