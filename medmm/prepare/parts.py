"""Preparing beyond one machine: ``--num-shards N --shard-index I`` picks a deterministic part of a raw-data
``medmm prepare`` command's input, and ``medmm prepare merge DIR... --out OUT`` joins the parts into one dataset.

Which part an item belongs to is a keyed hash of its key (a patient, a study, a slide, an image, a record) modulo
N, never its position, so every part is computed on its own: a SLURM array or a Kubernetes indexed job runs the
same command with ``--shard-index $TASK`` and its own ``--out``, with no coordinator. The train/eval split is a
keyed hash of the group key too (:func:`split_of`), so a merged dataset holds, as a set, exactly the records,
splits and errors one unsharded run writes.

Each part's folder holds the usual outputs plus ``part.json`` (``num_shards``, ``shard_index``, ``command``,
``input``, ``options``, for DICOM the de-identification ``salt_fingerprint``, and ``groups``: group key -> split
for the commands that split by group). :func:`merge_parts` checks that the parts come from one command with the
same input and options, that their salts agree, that they cover ``0..N-1`` exactly once and that no group (a
patient, an image) sits in two parts; then it concatenates the JSONL files (conversations, ``files.jsonl``,
``errors.jsonl``) with their paths rewritten to resolve from ``OUT``, merges the manifests (counts add up) and
hard-links every other file into ``OUT`` (a copy where the file system cannot link): the merged folder stands
alone, the parts can be deleted, and linking costs no space. A part's top-level shard ``shard-000003.tar``
becomes ``part00001-shard-000003.tar``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..utils import atomic_write_text

PART_FILE = "part.json"
MERGED_FILE = "merged.json"
# how a run was executed, not what it made: may differ between the machines of one job
EXECUTION_OPTIONS = frozenset({"workers", "device", "no_progress", "batch_size", "out", "num_shards", "shard_index",
                               "salt"})
# integer manifest fields that are settings (kept when the parts agree), not counts (added up)
SETTING_INTS = frozenset({"workers", "seed", "flank", "tile", "quality", "num_perm", "shingle", "min_chars",
                          "min_words", "max_chars", "size_2d", "version", "shard_maxcount", "num_shards"})
# what merge leaves behind: the part's own bookkeeping, and the salt (a secret: never copied around)
_NOT_MERGED = frozenset({PART_FILE, ".deid_salt", "run.json", "progress.jsonl"})


@dataclass(frozen=True)
class Part:
    """One part of a sharded prepare: ``shard_index`` of ``num_shards``."""

    num_shards: int
    """How many parts the input is split into."""
    shard_index: int
    """Which one this is, 0-based."""

    def __post_init__(self):
        if self.num_shards < 1:
            raise ConfigError(f"--num-shards must be at least 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index must be in 0..{self.num_shards - 1} (--num-shards {self.num_shards}), "
                              f"got {self.shard_index}")

    @classmethod
    def from_flags(cls, num_shards: int | None, shard_index: int | None) -> Part | None:
        """The part the CLI flags name; None without ``--num-shards`` (the whole input)."""
        if num_shards is None:
            if shard_index is not None:
                raise ConfigError("--shard-index needs --num-shards")
            return None
        if shard_index is None:
            raise ConfigError("--num-shards needs --shard-index")
        return cls(num_shards, shard_index)

    def holds(self, key: str) -> bool:
        """Whether the item keyed ``key`` belongs to this part."""
        return self.num_shards == 1 or part_of(key, self.num_shards) == self.shard_index


def holds(part: Part | None, key: str) -> bool:
    """``part.holds(key)``, True without a part."""
    return part is None or part.holds(key)


def _hash01(key: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8,
                                          person=person).digest(), "big")


def part_of(key: str, num_shards: int) -> int:
    """The part (0..num_shards-1) of the item keyed ``key``: a pure function of the key and ``num_shards``."""
    return _hash01(key, b"medmm-part") % num_shards


def split_of(key: str, eval_fraction: float, seed: int = 0) -> str:
    """``"eval"`` for about ``eval_fraction`` of the keys, else ``"train"``: a keyed hash of ``key`` under ``seed``.

    A function of the key alone (not of the position in a list or a part), so a group (a patient, an image) lands on
    the same side whichever part or run it is in; independent of :func:`part_of`.
    """
    if eval_fraction <= 0:
        return "train"
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=f"medmm-split-{seed}".encode()[:64])
    return "eval" if int.from_bytes(h.digest(), "big") / 2**64 < eval_fraction else "train"


def salt_fingerprint(salt: str | None) -> str | None:
    """An HMAC of a fixed string under the de-identification salt: equal salts give equal fingerprints, and the
    fingerprint does not reveal the salt. None without a salt (``--keep-phi``)."""
    if not salt:
        return None
    return hmac.new(salt.encode(), b"medmm de-identification salt fingerprint", hashlib.sha256).hexdigest()[:16]


def write_part(out: str | Path, part: Part | None, command: str, input: object, options: dict, **extra) -> None:
    """Write ``OUT/part.json`` for a sharded run (nothing without a part)."""
    if part is None:
        return
    rec = {"num_shards": part.num_shards, "shard_index": part.shard_index, "command": command, "input": input,
           "options": {k: v for k, v in sorted(options.items()) if k not in EXECUTION_OPTIONS}, **extra}
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / PART_FILE, json.dumps(rec, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------- merge


def _read_part(d: Path) -> dict:
    f = d / PART_FILE
    if not f.is_file():
        raise ConfigError(f"prepare merge: {d} holds no {PART_FILE} (not a part of a --num-shards run)")
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"prepare merge: {f} cannot be read ({type(e).__name__})") from e


def check_parts(dirs: list[Path]) -> list[dict]:
    """The parts' ``part.json``, sorted by index, after checking that they make one dataset.

    Raises:
        ConfigError: naming the first part that differs (command, input, options, number of parts, salt), a missing
            or duplicated index, or a group (patient, image) found in two parts.
    """
    if not dirs:
        raise ConfigError("prepare merge: no part folders given")
    parts = [dict(_read_part(d), dir=str(d)) for d in dirs]
    ref = parts[0]
    for p in parts[1:]:
        for k in ("command", "num_shards", "input", "options"):
            if p.get(k) != ref.get(k):
                raise ConfigError(f"prepare merge: part {p['dir']} has a different {k} from part {ref['dir']}: "
                                  f"{json.dumps(p.get(k), default=str)[:200]} vs {json.dumps(ref.get(k), default=str)[:200]}")
        if p.get("salt_fingerprint") != ref.get("salt_fingerprint"):
            raise ConfigError(f"prepare merge: part {p['dir']} was de-identified with a different salt from part "
                              f"{ref['dir']} (fingerprint {p.get('salt_fingerprint')} vs {ref.get('salt_fingerprint')}): "
                              f"run every part with the same --salt or $MEDMM_DEID_SALT")
    n = ref["num_shards"]
    seen = Counter(p["shard_index"] for p in parts)
    dup = sorted(i for i, c in seen.items() if c > 1)
    if dup:
        dirs_of = [p["dir"] for p in parts if p["shard_index"] == dup[0]]
        raise ConfigError(f"prepare merge: part {dup[0]} of {n} given more than once ({', '.join(dirs_of)})")
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise ConfigError(f"prepare merge: part(s) {', '.join(map(str, missing))} of {n} missing")
    parts.sort(key=lambda p: p["shard_index"])
    where: dict[str, tuple[int, str]] = {}
    for p in parts:
        for g, split in (p.get("groups") or {}).items():
            if g in where:
                raise ConfigError(f"prepare merge: group {g} (a patient or image) is in part {where[g][0]} and part "
                                  f"{p['shard_index']} ({p['dir']}): the parts were not split by group")
            where[g] = (p["shard_index"], split)
    return parts


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(src, dst)


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _rewrite(value, d: Path, out: Path, rename: dict[str, str]):
    """A modality value of a part's record -> the same reference seen from ``out``: a renamed shard
    (``shard.tar#key``), a path outside the part made relative to ``out``; inline values (SMILES, DNA) unchanged."""
    if isinstance(value, list):
        return [_rewrite(v, d, out, rename) for v in value]
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    head, sep, tail = value.partition("#")
    if head in rename:
        return rename[head] + sep + tail
    try:
        target = d / head
        if not target.exists():
            return value  # not a path: an inline value
    except (OSError, ValueError):
        return value
    full = os.path.normpath(os.path.abspath(target))
    if Path(full).is_relative_to(os.path.abspath(d)):
        return value  # inside the part: linked into out at the same place
    return Path(os.path.relpath(full, os.path.abspath(out))).as_posix() + sep + tail


def _rename_strings(obj, rename: dict[str, str]):
    if isinstance(obj, dict):
        return {k: _rename_strings(v, rename) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename_strings(v, rename) for v in obj]
    return rename.get(obj, obj) if isinstance(obj, str) else obj


def merge_manifests(docs: list[dict], key: str = "") -> object:
    """Several parts' manifests (or one field of them) -> one: counts add up, dictionaries merge key by key (a key
    in one part only is kept as is), lists concatenate unless identical, settings are kept when the parts agree and
    listed per part when they do not (``workers`` of different machines)."""
    if all(isinstance(x, dict) for x in docs):
        keys = list(dict.fromkeys(k for x in docs for k in x))
        return {k: merge_manifests([x[k] for x in docs if k in x], k) for k in keys}
    if all(x == docs[0] for x in docs) and not (all(_is_int(x) for x in docs) and key not in SETTING_INTS):
        return docs[0]
    if all(_is_int(x) for x in docs) and key not in SETTING_INTS:
        return sum(docs)
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in docs) and key not in SETTING_INTS:
        return round(sum(docs), 6)  # timings
    if all(isinstance(x, list) for x in docs):
        return [v for x in docs for v in x]
    return docs


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def merge_parts(dirs: list[str | Path], out: str | Path) -> dict:
    """Merge the folders of a ``--num-shards`` run into ``out``; returns what ``OUT/merged.json`` holds.

    Raises:
        ConfigError: the parts do not make one dataset (:func:`check_parts`), ``out`` is one of them or not empty,
            or two parts hold different files at the same path.
    """
    dirs, out = [Path(d) for d in dirs], Path(out)
    parts = check_parts(dirs)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"prepare merge: {out} is not empty")
    if any(out.resolve() == Path(p["dir"]).resolve() for p in parts):
        raise ConfigError(f"prepare merge: --out {out} is one of the parts")
    out.mkdir(parents=True, exist_ok=True)
    jsonl: dict[str, list[str]] = {}
    manifests: dict[str, list[dict]] = {}
    linked = copied = 0
    for p in parts:
        d, i = Path(p["dir"]), p["shard_index"]
        files = sorted(f for f in d.rglob("*") if f.is_file() and not any(x.startswith(".") for x in
                                                                              f.relative_to(d).parts))
        # a part's top-level shards are renamed: every part numbers its own from shard-000000
        rename = {f.name: f"part{i:05d}-{f.name}" for f in files if f.parent == d and f.suffix == ".tar"}
        for f in files:
            rel = f.relative_to(d)
            if rel.name in _NOT_MERGED and f.parent == d:
                continue
            if f.parent == d and f.suffix == ".jsonl":
                lines = jsonl.setdefault(f.name, [])
                for line in f.read_text().splitlines():
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if isinstance(rec, dict) and isinstance(rec.get("modalities"), dict):
                        rec["modalities"] = {k: _rewrite(v, d, out, rename) for k, v in rec["modalities"].items()}
                    lines.append(json.dumps(rec, ensure_ascii=False))
                continue
            if f.parent == d and f.suffix == ".json":  # manifest.json, stats.json
                manifests.setdefault(f.name, []).append(_rename_strings(json.loads(f.read_text()), rename))
                continue
            dst = out / rename.get(f.name, rel.as_posix()) if f.parent == d else out / rel
            if dst.exists():
                if not _same_file(f, dst):
                    raise ConfigError(f"prepare merge: {rel} differs between the parts (part {i}: {f})")
                continue
            _link(f, dst)
            if dst.stat().st_ino == f.stat().st_ino:
                linked += 1
            else:
                copied += 1
    for name, lines in jsonl.items():
        atomic_write_text(out / name, "".join(x + "\n" for x in lines))
    for name, docs in manifests.items():
        atomic_write_text(out / name, json.dumps(merge_manifests(docs), indent=2, ensure_ascii=False))
    info = {"command": parts[0]["command"], "input": parts[0]["input"], "options": parts[0]["options"],
            "num_shards": parts[0]["num_shards"], "salt_fingerprint": parts[0].get("salt_fingerprint"),
            "parts": [p["dir"] for p in parts], "files_linked": linked, "files_copied": copied,
            "jsonl": {k: len(v) for k, v in sorted(jsonl.items())}}
    atomic_write_text(out / MERGED_FILE, json.dumps(info, indent=2, default=str))
    return info
