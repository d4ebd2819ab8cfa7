"""The small shared core every stage imports down into (nothing here imports up).

- `core.errors`: the one user-error type and the CLI entry wrapper (one line, `error: ...`, exit 2);
- `core.files`: atomic writes (temp file, fsync, rename), so a kill never leaves half a file under its name;
- `core.units`: precision names -> dtypes, image-size normalisation.

Only the standard library at import time; torch is imported lazily where a dtype is asked for, so
`data_prep` and the CLIs' argument checks stay fast.
"""
