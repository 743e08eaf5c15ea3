"""Frozen-feature evaluation of an encoder, as the I-JEPA paper evaluates it (App. A).

One module each: ``datasets`` (digits, generated count/distance scenes, image folders),
``subsets`` (low-shot subsets and the held-out part of train), ``features`` (extraction and its
cache), the probes ``linear`` (a grid of heads in one pass), ``logreg``, ``attentive`` and
``knn``, ``results`` (what a probe returns, its file and table) and ``runner`` (one run:
``runner.evaluate``, what ``fastjepa eval METHOD`` runs). Nothing is imported here, so a probe
module loads without the others.
"""
