"""The dynamic batcher's parts; ``core/batcher.py`` puts them together as :class:`Batcher`.

``settings.py`` (what a caller configures and gets back: settings, results, errors),
``fair_queue.py`` (queueing policy: admission within the queue and memory budget, the fair
order between callers, dropping), ``workers.py`` (timers and threads: the batch delay timer
and the threads that call ``backend.infer``), ``stats.py`` (the counters and their snapshot).
"""
