"""Sections of ``benchmarks/gpu_check.py``: one module per section, shared helpers in ``common``.

Each section module exposes ``run(ctx: common.Context) -> None`` and records its checks, metrics and tables on
``ctx.report``, which is written to disk after every record (so a section stopped at its time limit keeps what it
measured). ``gpu_check.py`` runs every section in its own subprocess.
"""
