"""The tools around the library: the command line and what it runs.

- ``main``: ``python -m centerkern demo``, ``info``, ``compile``, ``bench`` and ``check``;
- ``demo``: the seed example on every backend, facenet against wen, a timing table;
- ``compile``: the numba kernels compiled into their cache ahead of time;
- ``bench``: every backend timed against the alternatives (``python -m centerkern bench``);
- ``alternatives``: the other implementations the bench times, run as published;
- ``first_call``: what a first call costs, each case in a fresh process;
- ``reports``: the provenance every results file records, and exporting a git revision.

Nothing in the library imports these; they import the library through its public functions.
"""
