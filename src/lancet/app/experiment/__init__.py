"""``lancet experiment``: experiments as data, run by one resumable driver, reported from their JSON.

An experiment file holds one JSON object per line (``spec``). Each line becomes the lancet
commands that measure it, ``profile -> profile-comm -> optimize -> bench`` (``steps``); steps that
several lines share run once. The driver (``driver``) runs each step as a subprocess, marks it done
only after its outputs are written, skips what an earlier run finished, stops before a step that
cannot finish in the time budget, and stops on the first failed step. ``report`` renders the
results as markdown tables and charts.
"""
