"""Shared helpers of the reliability tests: a cohort with planted PHI, output scans, a stoppable S3 server."""

from __future__ import annotations

import contextlib
import csv
import logging
import socket
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from molre.data import shards, storage
from molre.data.dicom_write import write_dicom_series, write_nifti
from tests import tiny_data

# ---------------------------------------------------------------------------------------------------- planted PHI

# Every header field a hospital export carries and de-identification must drop. Distinct from the values in
# tests/data/malformed.py so that a hit here is attributable to these tests.
PHI = {
    "PatientName": "Quasimodo^Esmeralda^Reliability",
    "PatientID": "MRN-RELY-80085",
    "PatientBirthDate": "19510623",
    "AccessionNumber": "ACCRELY4242",
    "InstitutionName": "Saint Reliability Infirmary",
    "ReferringPhysicianName": "Frollo^Claude",
    "StudyDescription": "CT HEAD for Quasimodo",
    "StudyDate": "20190415",
    "OtherPatientIDs": "OTHERID-77123",
    "PatientAddress": "7 Rue du Cloitre Paris",
}
PHI_TOKENS = ("Quasimodo", "Esmeralda", "Frollo", "Reliability Infirmary", "MRN-RELY", "ACCRELY", "OTHERID")
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"  # every UID written below starts here (a study/series/frame UID)
SALT = b"reliability-salt-7f3a9c-never-written"
GRID = (8, 32, 32)  # output grid (D, H, W) of the small preprocess runs here
SPACING_OUT = (8.0, 6.0, 6.0)
SPACING_IN = (5.0, 3.0, 3.0)
FINDINGS = ("epidural_hematoma", "acute_subdural_hematoma", "midline_shift")


def phi_values(extra: Iterable[str] = ()) -> list[str]:
    """Every planted value that must never appear in an output byte, a log line or a message."""
    values = {*PHI.values(), *PHI_TOKENS, *extra}
    values |= {v.replace("^", " ") for v in values}  # as a name is shown once formatted
    return sorted(values)


def head_ct(seed: int, shape=(12, 48, 48)) -> np.ndarray:
    """A small off-centre head in HU (air, bone shell, brain) that passes ingest validation."""
    return tiny_data.head_ct(seed, shape, radii=(5, 18, 15), jitter=3, jitter_scale=(0.3, 1, 1), brain=0.85)


def phi_series(folder: Path, seed: int, patient: str, study_no: int, **kwargs) -> list[Path]:
    """One DICOM series with every field of ``PHI`` planted, ``patient`` as PatientID, UIDs under ``UID_ROOT``."""
    extra = {k: v for k, v in PHI.items() if k not in ("PatientName", "PatientID", "StudyDate")}
    extra.update(kwargs.pop("extra", {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_dicom_series(
            kwargs.pop("hu", None) if "hu" in kwargs else head_ct(seed),
            kwargs.pop("spacing", SPACING_IN),
            folder,
            patient_id=patient,
            patient_name=PHI["PatientName"],
            study_uid=f"{UID_ROOT}.1.{study_no}",
            series_uid=kwargs.pop("series_uid", f"{UID_ROOT}.2.{study_no}"),
            study_date=PHI["StudyDate"],
            institution=PHI["InstitutionName"],
            accession=PHI["AccessionNumber"],
            description=PHI["StudyDescription"],
            extra=extra,
            **kwargs,
        )


def write_cohort(root: Path, n_studies: int = 6, n_patients: int = 4, nifti: bool = True) -> dict:
    """``n_studies`` good studies (the last one NIfTI when ``nifti``) of ``n_patients`` patients under
    ``root/input`` and a generic ``root/labels.csv`` (patient ids = planted MRNs)."""
    input_dir, rows = root / "input", []
    rng = np.random.default_rng(1)
    for i in range(n_studies):
        study, patient = f"study_{i:02d}", f"{PHI['PatientID']}-{i % n_patients}"
        if nifti and i == n_studies - 1:
            write_nifti(head_ct(i), SPACING_IN, input_dir / study / f"{study}.nii.gz")
        else:
            phi_series(input_dir / study, i, patient, i)
        rows.append([study, patient, *(rng.random(len(FINDINGS)) < 0.4).astype(int)])
    labels = root / "labels.csv"
    write_labels(labels, rows)
    return {"input": input_dir, "labels": labels, "rows": rows, "root": root}


def write_labels(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["study_id", "patient_id", *FINDINGS], *rows])
    return path


SETTINGS = dict(spacing=SPACING_OUT, grid=GRID, salt=SALT, shard_size=2, progress=False)


# ---------------------------------------------------------------------------------------------------- scans


def output_blobs(root: str) -> dict[str, bytes]:
    """Every object under ``root`` (local or s3://) as bytes, plus each readable shard's decoded non-volume
    content and Parquet metadata (a string inside zstd pages is not visible in the raw bytes)."""
    if storage.is_s3(root):
        fs, path = storage.filesystem(root)
        names = ["s3://" + p for p in fs.find(path)]
    else:
        names = [str(p) for p in Path(root).rglob("*") if p.is_file()]
    out = {}
    for name in names:
        out[name] = storage.read_bytes(name)
        if name.endswith(shards.SHARD_SUFFIX):
            table = shards.read_shard(name)
            decoded = repr(table.drop_columns(["volume"]).to_pylist()) + repr(table.schema.metadata)
            out[name + "#decoded"] = decoded.encode()
    return out


def find_secrets(blobs: dict[str, bytes], secrets: Iterable[str | bytes]) -> list[str]:
    """``"<secret> in <name>"`` for every secret (case-insensitive) found in any blob."""
    hits = []
    for secret in secrets:
        needle = (secret if isinstance(secret, bytes) else secret.encode()).lower()
        hits += [f"{secret!r} in {name}" for name, data in blobs.items() if needle in data.lower()]
    return hits


class Records(logging.Handler):
    """Keeps every formatted log record (any logger it is attached to, DEBUG and up), exception text included."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


# ---------------------------------------------------------------------------------------------------- S3 faults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StoppableS3:
    """An S3 endpoint on a fixed loopback port that a test can take down and bring back.

    moto's server runs on a port of its own behind a small TCP relay on ``port``; ``stop()`` closes the relay's
    listening socket and cuts every open connection (stopping moto's werkzeug server alone would leave keep-alive
    connections served by their handler threads: no outage for a client with a pooled connection), ``start()``
    listens again on the same port. Buckets live in moto's in-process backend and survive, as a real server's
    disks would.

    The relay reads the request heads of what it forwards (``requests``: ``(method, path)`` in arrival order, from
    every process that uses the endpoint), and ``stop_on_request`` takes the server down just before a chosen
    request would be relayed: an outage at a deterministic point of a run whose reads happen in Ray workers.
    """

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        self._upstream = self._moto.get_host_and_port()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.stops = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self.requests: list[tuple[str, str]] = []
        self._trigger: tuple[Callable[[str, str], bool], int, float | None, threading.Event] | None = None

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="s3-relay").start()

    def stop(self) -> None:
        """Refuse new connections and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is None:
            return
        self.stops += 1
        for sock in (listener, *sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._trigger = None
        self.stop()
        self._moto.stop()

    def count(self, match: Callable[[str, str], bool]) -> int:
        """How many relayed requests ``match(method, path)`` accepts (path without the query string)."""
        with self._lock:
            return sum(1 for method, path in self.requests if match(method, path))

    def stop_on_request(
        self, match: Callable[[str, str], bool], nth: int = 1, restart_after: float | None = None
    ) -> threading.Event:
        """From now on, count the requests ``match(method, path)`` accepts; instead of relaying the ``nth`` one,
        stop the server (that request's connection is cut with the others: the client sees the outage on it) and
        start it again ``restart_after`` seconds later (None: it stays down). The event is set at the stop."""
        fired = threading.Event()
        with self._lock:
            self._trigger = (match, nth, restart_after, fired)
        return fired

    def _on_request(self, method: str, path: str) -> bool:
        """Record one request head; True when it must not be relayed (the trigger stopped the server)."""
        with self._lock:
            self.requests.append((method, path))
            trigger = self._trigger
            if trigger is None or not trigger[0](method, path):
                return False
            match, nth, restart_after, fired = trigger
            self._trigger = (match, nth - 1, restart_after, fired) if nth > 1 else None
        if nth > 1:
            return False
        self.stop()
        fired.set()
        if restart_after is not None:
            threading.Timer(restart_after, self.start).start()
        return True

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
            for a, b, heads in ((client, server, RequestHeads()), (server, client, None)):
                threading.Thread(
                    target=self._pump, args=(a, b, heads), daemon=True, name="s3-relay-pump"
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, heads: RequestHeads | None = None) -> None:
        try:
            while data := source.recv(1 << 16):
                if heads is not None and any(self._on_request(*head) for head in heads.feed(data)):
                    return  # the server was stopped instead of receiving this request
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open -= {source, sink}

    def bucket(self) -> str:
        import boto3

        name = f"molre-faults-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, uri: str) -> dict[str, bytes]:
        """Every object under ``uri`` read straight from moto's backend (works while the endpoint is down)."""
        from moto.s3.models import s3_backends

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        for account in s3_backends.values():
            found = account["global"].buckets.get(bucket)
            if found is not None:
                return {k: v.value for k, v in found.keys.items() if k.startswith(prefix)}
        raise KeyError(bucket)


class RequestHeads:
    """The request heads in one connection's client -> server byte stream (HTTP/1.1: a head, then a body of
    Content-Length bytes or in chunks), fed as the bytes arrive. A stream it cannot follow stops being parsed."""

    def __init__(self):
        self._buffer = b""
        self._skip = 0  # body bytes still to pass over
        self._state = "head"  # head | chunk-size | trailers | lost

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        if self._state == "lost":
            return []
        self._buffer += data
        found: list[tuple[str, str]] = []
        try:
            while self._step(found):
                pass
        except (ValueError, IndexError):
            self._state, self._buffer = "lost", b""
        return found

    def _step(self, found: list[tuple[str, str]]) -> bool:
        """Consume one unit (body bytes, a chunk-size line, a trailer line, a head); False when more bytes are
        needed."""
        if self._skip:
            taken = min(self._skip, len(self._buffer))
            self._buffer, self._skip = self._buffer[taken:], self._skip - taken
            return bool(self._buffer) and not self._skip
        if self._state in ("chunk-size", "trailers"):
            end = self._buffer.find(b"\r\n")
            if end < 0:
                return False
            line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            if self._state == "trailers":
                self._state = "trailers" if line else "head"
            elif (size := int(line.split(b";")[0], 16)) == 0:
                self._state = "trailers"
            else:
                self._skip = size + 2  # the chunk and its CRLF
            return True
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4 :]
        request, *lines = head.split("\r\n")
        method, target, _ = request.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        found.append((method, target.split("?", 1)[0]))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk-size"
        else:
            self._skip = int(headers.get("content-length") or 0)
        return True
