"""``python -m data_prep shard|dedup|verify|demo-data``: image collections -> WebDataset shards with Ray.

Design (why it is built this way)
---------------------------------
The driver *plans*, Ray tasks *work*; the unit of work, atomicity and retry is one whole shard.

1. List (driver, no image bytes read; ``sources.py``): every input gets a stable id -- its POSIX path
   relative to SRC, ``<class>.tar/<member>`` for archive members (read in place at their offset, never
   extracted), the path as written in a CSV/JSONL manifest, ``<ImageID>.jpg`` of an OpenImages annotation
   file (``manifests.py``), ``<shard>.tar/<image member>`` of a webdataset sample (read in place) or
   ``<file>.parquet/<row>`` of a parquet row (read by row group; ``packed.py``) -- and a class. SRC may be an
   fsspec URL (``s3://bucket/prefix``) for every kind but manifests. Files with a non-image extension, outside any class folder, of a
   class missing from ``--classes``, or named by a manifest but absent, are rejected here.
   Multi-label sources (manifest ``labels``, OpenImages) give each file a label list instead: unknown labels
   are dropped and counted, a file with none left is rejected. Whether a split is multi-label is a property
   of its source, so a split never mixes sample layouts and single-label shards keep their exact bytes.
   The driver never holds the listing: each row goes, as it is listed, to one of 256 spill files (a local temp
   folder) chosen by the top byte of its order key sha256(seed, id); then one partition at a time is sorted by
   key, checked (a manifest path listed twice) and judged into ``inputs-PPP.jsonl``. A partition of more than
   ``spill.SORT_ROWS`` (10k) rows is split again by the key's next byte and sorted piece by piece
   (``spill.sorted_spill``: same order, bounded memory), so the driver's peak does not grow with N. Every
   lister streams (ImageFolder trees, manifests, per-class tars, webdataset tars, parquet files) except
   OpenImages', which groups each image's label rows first. Per-class tars, webdataset tars and parquet files
   are listed in parts (one per file) by Ray tasks across the cluster, each part's rows kept in
   ``OUT/_state/<split>.listing/`` with a receipt, so a killed or requeued job lists only the parts without
   one; the driver appends every part's rows to the same spill files, so the order does not depend on who
   listed what (``shard/listing_parts.py``); the partitions are then judged in groups by Ray tasks on the
   driver's node (``shard/judge_tasks.py``).
2. Scan (Ray tasks over whole partitions, about 1/(4*in_flight) of the inputs each but at most about 100k
   unless one partition holds more; the driver copies a partition's judged inputs to
   ``OUT/_state/<split>/inputs/`` and the task streams through them; ``images.scan``): read each file, sha1 it,
   open the
   header with Pillow (not an image, empty, more than ``--max-pixels``) and check completeness (PNG chunk
   walk with CRCs; JPEG end marker, with a 1/8-scale decode only when the marker is missing; other
   formats are fully decoded). A pure function of the bytes: it can run anywhere, any number of times.
   Each partition's results go to ``OUT/_state/<split>/scan/PPP.jsonl.gz`` plus a receipt: a killed job
   rescans only partitions without a receipt of this fingerprint. With ``--exclude-near`` the scan also
   takes each usable image's perceptual hash and rejects it as ``near_duplicate`` when an evaluation image
   is within ``--near-distance`` bits (``near_dup/``; the index is built once by the driver and shared
   through Ray's object store): still a pure function of the bytes (and the eval sets), so it is planned
   like any other reject.
3. Plan (driver; ``plan.py``): the usable inputs are ordered by sha256(seed, id) -- a shuffle that depends
   only on the input list and the seed, not on an RNG's version -- and cut into shards of ``--shard-size``.
   Since partitions are consecutive key ranges, that order is partition 0 sorted, partition 1 sorted, ...;
   so the plan is the per-partition usable counts: shard i covers global positions [i*S, (i+1)*S), known
   ranges of known partitions (``plan.shard_ranges``), and its write task reads its entries from the scan
   files itself. The driver holds O(partitions + shards) numbers. ``--dedup`` keeps the first copy of equal
   sha1s in id order: the usable (sha1, id) pairs are spilled to 256 local files by sha1 and resolved one
   file at a time, so the driver holds 1/256 of them plus the duplicates found (only with --dedup).
   The plan (counts, duplicates) is saved atomically to ``OUT/_state/<split>/plan.json.gz`` so a resumed job
   neither rescans nor re-plans.
4. Write (one Ray task per shard; ``tasks.write_shard``): read the shard's inputs, check each sha1
   against the scan, decode/resize/encode, stream the samples into a dot-named temp file beside the
   shard (``core.files.atomic_path``) with ``tarfile`` (every header field pinned; members ``cls``, ``jpg``,
   ``json``, plus ``labels`` -- "3,7,12", first == ``cls`` -- in multi-label splits), fsync, rename to
   ``<split>-NNNNNN.tar``, then atomically write ``OUT/_state/<split>/receipts/<name>.json`` (sha256,
   bytes, count, late rejects, node id).
   One task per ~1,000 images keeps Ray's per-task overhead (scheduling, argument transfer, a result)
   negligible, keeps every worker busy on pure Pillow work, and makes "a shard" the only thing that can
   be half-done.
5. Describe (driver): ``_info.json`` (timm-readable, merged per split) and ``rejects.jsonl`` are
   written atomically from the plan and the receipts; the plan file is deleted, the receipts stay. A local
   rejects.jsonl is streamed: this split's rejects are sorted by source with an external merge sort
   (``spill.external_sort``) and written line by line; an object-store one is compare-and-swapped whole.

Exactly once. The plan assigns each usable input to exactly one position of exactly one shard. On disk a
shard is either absent, a temp file (dot-named: ignored, deleted at the next start), or complete (renamed only
after fsync). A shard counts as done only if its receipt belongs to this plan *and* the tar's sha256
matches the receipt; anything else is rewritten from scratch. Killing the driver (SIGKILL: its private
Ray dies with it) or a worker (Ray retries the task into a fresh temp name) therefore never loses or
duplicates a sample: re-running the same command finishes the job.

Byte-identical output. A shard's bytes are a pure function of its planned inputs and the image options
(fixed tar headers, fixed JPEG settings, deterministic Pillow/libjpeg-turbo decoding incl. ``draft``).
Shard lengths: every shard has ``--shard-size`` samples except the last, and except a shard holding a
file that passes the scan but fails the full decode (corrupt data inside a complete file: rare); that
file is left out and reported, so the shard is one shorter -- again a pure function of its inputs, so a
resumed or repeated job writes the same bytes. ``_info.json`` records the exact ``shard_lengths``.

Refusal. ``_info.json`` and the saved plan carry a fingerprint of the input listing (kind, classes, the row
count and the sum mod 2**256 of sha256(id, label, size, mtime) over all rows: independent of listing order and
partitioning, changed by any changed row) and of every option that changes the bytes; a different command against an existing
split is refused with one line naming what changed, unless ``--overwrite``.
"""
import sys

from data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
