"""Input enumeration (image tree, CSV/JSONL/Parquet caption table, existing WebDataset/img2dataset tars) and per-input byte loading, local or fsspec.

The enumeration is a deterministic, ordered list: sorted file paths for a tree, row order for a table,
sorted tar names then member order for tars. An input's position in it is its sample key, so reruns and
any number of workers see the same inputs under the same keys. Rows that cannot even name an image
(invalid JSON line, empty path cell) stay in the list with an `error` so they are accounted for as skips.
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from data_prep.format import parse_sample, read_parquet
from data_prep.images import SkipImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
TABLE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
PATH_COLUMNS = ("path", "image_path", "file", "filename", "image", "url")  # auto-detected, in this order
CAPTION_COLUMNS = ("caption", "text", "prompt", "title")
CAPTION_JSON_KEYS = ("caption", "text", "prompt")


@dataclass(frozen=True, slots=True)
class InputItem:
    """One input of the enumeration; `source` is what the sample's json and skipped.jsonl report."""

    source: str
    url: str  # the image file, or the tar that holds the sample
    byte_range: tuple[int, int] | None = None  # (offset, size) of the sample's members inside a tar `url`
    caption: str | bytes | None = None  # inline caption; bytes = not valid UTF-8 (skipped by the loader)
    caption_url: str | None = None  # sidecar .txt / .json
    error: str | None = None  # enumeration-time problem (reason "bad_row")


@dataclass(frozen=True, slots=True)
class LoadedItem:
    image: bytes
    caption: str
    extra: dict[str, Any]  # metadata carried over from the input (e.g. img2dataset's url)


def _child(spec: str, root: str, path: str) -> str:
    """`path` found under `root` re-expressed under the user's spelling `spec` (keeps URLs and relative paths)."""
    rel = posixpath.relpath(path, root) if "://" in spec else os.path.relpath(path, root)
    return spec.rstrip("/") + "/" + rel.replace(os.sep, "/")


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def enumerate_inputs(spec: str, *, path_column: str | None = None, caption_column: str | None = None) -> list[InputItem]:
    """Ordered inputs of INPUT: a directory of images, a directory (or glob / brace list) of tars, a table, or one tar."""
    if any(c in spec for c in "*?{"):
        return _enumerate_tars(_expand_tar_pattern(spec))
    fs, root = fsspec.core.url_to_fs(spec)
    if fs.isfile(root):
        ext = _ext(root)
        if ext == ".tar":
            return _enumerate_tars([spec])
        if ext in TABLE_EXTENSIONS:
            return _enumerate_table(spec, fs, root, ext, path_column, caption_column)
        raise ValueError(f"{spec}: not a directory, table ({', '.join(TABLE_EXTENSIONS)}) or .tar")
    if not fs.isdir(root):
        raise FileNotFoundError(f"input {spec!r} does not exist")
    files = sorted(fs.find(root))
    tars = [p for p in files if p.endswith(".tar")]
    if tars:
        # A directory holding tars (e.g. img2dataset output, with its .parquet/_stats.json) is a tar input.
        return _enumerate_tars([_child(spec, root, p) for p in tars])
    return _enumerate_tree(spec, root, files)


def _enumerate_tree(spec: str, root: str, files: list[str]) -> list[InputItem]:
    present = set(files)
    items = []
    for p in files:
        if _ext(p) not in IMAGE_EXTENSIONS:
            continue
        stem = os.path.splitext(p)[0]
        caption = next((c for c in (stem + ".txt", stem + ".json") if c in present), None)
        items.append(
            InputItem(source=_child(spec, root, p), url=_child(spec, root, p), caption_url=_child(spec, root, caption) if caption else None)
        )
    return items


def _expand_tar_pattern(spec: str) -> list[str]:
    import braceexpand  # a webdataset dependency: the same `{000..099}` syntax webdataset accepts

    out: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        if any(c in pattern for c in "*?"):
            fs, _ = fsspec.core.url_to_fs(pattern)
            out.extend(sorted(fs.unstrip_protocol(p) if "://" in pattern else p for p in fs.glob(pattern)))
        else:
            out.append(pattern)
    return out


def _enumerate_tars(tar_urls: list[str]) -> list[InputItem]:
    """One input per sample (consecutive members sharing a key, as webdataset groups them) of each tar, in order."""
    items: list[InputItem] = []
    for url in tar_urls:
        items.extend(_scan_tar(url))
    return items


def _scan_tar(url: str) -> Iterator[InputItem]:
    # Reads headers only (seeks over member data) for local files; remote tars are read through fsspec's cache.
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        key, start, end = None, 0, 0
        for info in tar:
            if not info.isfile():
                continue
            dirname, base = posixpath.split(info.name)
            member_key = posixpath.join(dirname, base.split(".", 1)[0])
            if member_key != key:
                if key is not None:
                    yield InputItem(source=f"{url}#{key}", url=url, byte_range=(start, end - start))
                key, start = member_key, info.offset
            end = info.offset_data + info.size + (-info.size % tarfile.BLOCKSIZE)
        if key is not None:
            yield InputItem(source=f"{url}#{key}", url=url, byte_range=(start, end - start))


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, spec: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{spec}: no {what} column {wanted!r} (columns: {columns})")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None and what == "path":
        raise ValueError(f"{spec}: no path column among {columns}; pass --path-column")
    return found


def _table_item(spec: str, base: str, path: Any, caption: Any) -> InputItem:
    if not isinstance(path, str) or not path:
        return InputItem(source=f"{spec}:{base}", url="", error=f"empty or non-string path {path!r}")
    if isinstance(caption, str):
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: the table's bytes were not UTF-8
            caption = caption.encode("utf-8", "surrogateescape")
    elif caption is not None and not isinstance(caption, bytes):
        caption = str(caption)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return InputItem(source=path.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), url="", error="path is not valid UTF-8")
    url = path if "://" in path or path.startswith("/") else base.rstrip("/") + "/" + path
    return InputItem(source=url, url=url, caption=caption)


def _enumerate_table(spec: str, fs: fsspec.AbstractFileSystem, root: str, ext: str, path_column: str | None, caption_column: str | None) -> list[InputItem]:
    """Rows in file order; relative paths are relative to the table's directory."""
    base = spec.rsplit("/", 1)[0] if "/" in spec else "."
    if ext == ".parquet":
        with fs.open(root, "rb") as f:
            table = read_parquet(f)
        pcol = _pick_column(table.column_names, path_column, PATH_COLUMNS, "path", spec)
        ccol = _pick_column(table.column_names, caption_column, CAPTION_COLUMNS, "caption", spec)
        paths = table.column(pcol).to_pylist()
        captions = table.column(ccol).to_pylist() if ccol else [None] * len(paths)
        return [_table_item(spec, base, p, c) for p, c in zip(paths, captions)]

    # surrogateescape keeps invalid UTF-8 bytes recoverable, so one bad caption skips one row, not the table.
    text = fs.cat_file(root).decode("utf-8", "surrogateescape")
    if ext in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if ext == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        pcol = _pick_column(columns, path_column, PATH_COLUMNS, "path", spec)
        ccol = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", spec)
        return [_table_item(spec, base, row.get(pcol), row.get(ccol) if ccol else None) for row in reader]

    items: list[InputItem] = []
    pcol, ccol = path_column, caption_column
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            items.append(InputItem(source=f"{spec}:{lineno}", url="", error=f"line {lineno}: {e}"))
            continue
        if pcol is None:
            pcol = _pick_column(list(row), None, PATH_COLUMNS, "path", spec)
        if ccol is None:
            ccol = next((c for c in CAPTION_COLUMNS if c in row), None)
        items.append(_table_item(spec, base, row.get(pcol), row.get(ccol) if ccol else None))
    return items


def _decode_caption(raw: bytes | str | None, source: str) -> str:
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipImage("bad_caption_encoding", f"caption of {source}: {e}") from None


def _caption_from_json(raw: bytes, source: str) -> str:
    try:
        meta = json.loads(_decode_caption(raw, source))
    except json.JSONDecodeError:
        return ""  # a sidecar that is not JSON carries no caption; the image is still usable
    if isinstance(meta, dict):
        for k in CAPTION_JSON_KEYS:
            if isinstance(meta.get(k), str):
                return meta[k]
    return ""


def read_image_bytes(item: InputItem) -> tuple[bytes, dict[str, bytes]]:
    """The input's image bytes (and, for tar inputs, its other members); SkipImage('unreadable'|'not_an_image'|'bad_row')."""
    if item.error is not None:
        raise SkipImage("bad_row", item.error)
    try:
        fs, path = fsspec.core.url_to_fs(item.url)
        if item.byte_range is None:
            return fs.cat_file(path), {}
        start, size = item.byte_range
        members = parse_sample(fs.cat_file(path, start=start, end=start + size))
    except (OSError, ValueError, tarfile.TarError) as e:  # missing, permission, broken symlink, bad range
        raise SkipImage("unreadable", f"{type(e).__name__}: {e}") from None
    suffix = next((s for s in members if s.lower() in TAR_IMAGE_SUFFIXES), None)
    if suffix is None:
        raise SkipImage("not_an_image", f"tar sample has no image member (members: {sorted(members)})")
    return members.pop(suffix), members


def read_caption(item: InputItem, members: dict[str, bytes]) -> tuple[str, dict[str, Any]]:
    """Caption text (UTF-8 checked) and extra metadata for an input whose image was read by `read_image_bytes`."""
    extra: dict[str, Any] = {}
    if item.byte_range is not None:
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except (ValueError, UnicodeDecodeError):
                meta = None
            if isinstance(meta, dict) and isinstance(meta.get("url"), str):
                extra["url"] = meta["url"]  # img2dataset records where it downloaded the image from
        if "txt" in members:
            return _decode_caption(members["txt"], item.source).strip(), extra
        return (_caption_from_json(members["json"], item.source) if "json" in members else ""), extra
    if item.caption_url is not None:
        try:
            with fsspec.open(item.caption_url, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise SkipImage("unreadable", f"caption {item.caption_url}: {type(e).__name__}: {e}") from None
        if item.caption_url.endswith(".json"):
            return _caption_from_json(raw, item.source), extra
        return _decode_caption(raw, item.source).strip(), extra
    return _decode_caption(item.caption, item.source), extra
