"""s3://bucket/prefix: the cold tier on an S3-compatible object store (AWS S3,
MinIO, Ceph RGW, SeaweedFS) through boto3 (`pip install lmcache[s3]`).

One chunk is one object, `<prefix><key string>`, holding the serde blob unchanged
(the header checks apply as on every tier). Credentials come from boto3's usual
chain (AWS_* variables, ~/.aws files, instance roles) and are never logged; a
non-AWS store is named by the config key s3_endpoint_url (path-style addressing).

Costs: a lookup of n chunks is HEAD requests sent in waves of `concurrency`, in
parallel, stopping at the first wave with a miss (so ceil(hits / concurrency) + 1
round trips at most); the chunks of a load are GETs in parallel (`concurrency` at a
time); the chunks of a store are PUT several at once (put_many); a large chunk is
written as a multipart upload of parallel parts and read as parallel ranged GETs. remote_timeout bounds each whole operation (a lookup, a load,
a put with all its parts), not each read: past it the operation is a miss (its
requests are left to botocore's own read timeout, and an upload is never completed
after it). The store being down or slow is a miss, one log line per outage and a
back-off (outage.py); any other error is a miss logged once per kind. Nothing is
remembered about which objects exist.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

from lmcache.v1.memory import MemoryObj
from lmcache.v1.remote_urls import parse_s3
from lmcache.v1.storage_backend import serde
from lmcache.v1.storage_backend.outage import Outage
from lmcache.v1.storage_backend.remote_blob import chunk_or_miss
from lmcache.v1.storage_backend.serde import Allocator, ChecksumMemo
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)
PART_BYTES = 8 * 2**20  # multipart part / ranged read size (S3's minimum part is 5 MiB)
_ABSENT = {"404", "NoSuchKey", "NotFound"}


class DeadlineExceeded(TimeoutError):
    """An operation took longer than remote_timeout as a whole."""


class S3Backend:
    name = "remote"

    def __init__(self, url: str, *, endpoint_url: str | None = None, timeout: float = 2.0,
                 connect_timeout: float = 0.5, retry_interval: float = 10.0, stats: EngineStats | None = None,
                 concurrency: int = 16, integrity: serde.Integrity = serde.NO_SECRET):
        self._integrity = integrity  # every read checks the key digest (and MAC) in the header
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise ImportError("remote_url s3://... needs boto3: pip install 'lmcache[s3]'") from None
        self.url = url
        self.location = parse_s3(url)
        self.concurrency = concurrency
        self._stats = stats or EngineStats()
        self._exc = botocore.exceptions
        config = botocore.config.Config(
            connect_timeout=connect_timeout, read_timeout=timeout, retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=2 * concurrency,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        shown = f"{url} at {endpoint_url}" if endpoint_url else url
        self._outage = Outage(shown, logger, self._stats, retry_interval, first_retry=0.25, tier=self.name)
        self._unreachable = (self._exc.EndpointConnectionError, self._exc.ConnectTimeoutError,
                             self._exc.ReadTimeoutError, self._exc.ConnectionClosedError,
                             self._exc.HTTPClientError, OSError)
        self.timeout = timeout
        # whole-object requests (HEAD, GET, PUT), and the parts of one object: two pools,
        # so an object's request never waits for a worker its own parts hold
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lmcache-s3")
        self._parts = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lmcache-s3-parts")
        # put_many's puts, each waiting on its requests in the pools above
        self._putters = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lmcache-s3-puts")
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    @property
    def is_down(self) -> bool:
        return self._outage.is_down

    def object_key(self, key: CacheEngineKey) -> str:
        return self.location.prefix + key.to_string()

    # -- faults -----------------------------------------------------------------
    def _fault(self, op: str, exc: BaseException) -> None:
        """Outage (unreachable, timeout, 5xx) or an error logged once per kind."""
        code = self._code(exc)
        if isinstance(exc, self._unreachable) or (code or "").startswith("5") or code in ("SlowDown",
                                                                                         "ServiceUnavailable"):
            self._outage.failed(exc)
            return
        kind = f"{op}:{type(exc).__name__}:{code}"
        with self._lock:
            if kind in self._logged:
                return
            self._logged.add(kind)
        logger.warning("remote tier %s: %s failed: %s: %s (treated as a miss; further such errors are not logged)",
                       self.url, op, type(exc).__name__, exc)

    def _code(self, exc: BaseException) -> str | None:
        if isinstance(exc, self._exc.ClientError):
            return str(exc.response.get("Error", {}).get("Code"))
        return None

    # -- lookup -----------------------------------------------------------------
    def _head(self, name: str) -> bool | None:
        """True/False: the object exists or not; None: could not tell (fault)."""
        try:
            self._client.head_object(Bucket=self.location.bucket, Key=name)
            return True
        except Exception as exc:  # noqa: BLE001 - every fault is a miss
            if self._code(exc) in _ABSENT:
                return False
            self._fault("HEAD", exc)
            return None

    def contains(self, key: CacheEngineKey) -> bool:
        return self.prefix_count([key]) == 1

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _all_by(self, pending: list, deadline: float) -> list:
        """The results of `pending` (futures); DeadlineExceeded if they are not all done
        by `deadline` (those not started are cancelled, the others left to run out)."""
        done, late = futures.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if late:
            for future in late:
                future.cancel()
            raise DeadlineExceeded(f"took longer than {self.timeout:.3g}s (remote_timeout)")
        return [future.result() for future in pending]

    def prefix_count(self, keys: list[CacheEngineKey]) -> int:
        n, deadline = 0, self._deadline()
        while n < len(keys) and self._outage.usable():
            wave = [self.object_key(k) for k in keys[n:n + self.concurrency]]
            try:
                found = self._all_by([self._pool.submit(self._head, name) for name in wave], deadline)
            except DeadlineExceeded as exc:
                self._fault("HEAD", exc)
                return n
            if any(f is not None for f in found):
                self._outage.worked()
            for hit in found:
                if not hit:
                    return n
                n += 1
        return n

    # -- load -------------------------------------------------------------------
    def _range(self, name: str, start: int, end: int):
        reply = self._client.get_object(Bucket=self.location.bucket, Key=name, Range=f"bytes={start}-{end - 1}")
        return start, reply["Body"].read()

    def _fetch(self, name: str, deadline: float) -> bytes | bytearray | None:
        try:
            first = self._client.get_object(Bucket=self.location.bucket, Key=name, Range=f"bytes=0-{PART_BYTES - 1}")
            head = first["Body"].read()
            total = int(first.get("ContentRange", "/%d" % len(head)).rsplit("/", 1)[1])
            if total <= len(head):
                return head
            blob = bytearray(total)
            blob[:len(head)] = head
            parts = [self._parts.submit(self._range, name, s, min(s + PART_BYTES, total))
                     for s in range(len(head), total, PART_BYTES)]
            for start, data in self._all_by(parts, deadline):
                blob[start:start + len(data)] = data
            return blob
        except Exception as exc:  # noqa: BLE001
            if self._code(exc) in _ABSENT or self._code(exc) == "InvalidRange":  # InvalidRange: an empty object
                return b"" if self._code(exc) == "InvalidRange" else None
            raise

    def get(self, key: CacheEngineKey, allocate: Allocator) -> MemoryObj | None:
        return self.get_many([key], allocate)[0]

    def get_many(self, keys: list[CacheEngineKey], allocate: Allocator) -> list[MemoryObj | None]:
        """The chunks of `keys`, in order, read in parallel (`concurrency` at a time); None
        from the first that is missing (its cause counted once). Past remote_timeout
        for them all, what has not arrived is a miss."""
        out: list[MemoryObj | None] = [None] * len(keys)
        if not keys or not self._outage.usable():
            return out
        names = [self.object_key(k) for k in keys]
        deadline = self._deadline()
        pending = [self._pool.submit(self._fetch, name, deadline) for name in names]
        futures.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        for i, (key, name, future) in enumerate(zip(keys, names, pending)):
            if not future.done():
                for late in pending[i:]:
                    late.cancel()
                self._fault("GET", DeadlineExceeded(f"took longer than {self.timeout:.3g}s (remote_timeout)"))
                break
            if future.exception() is not None:
                self._fault("GET", future.exception())
                break
            self._outage.worked()
            out[i] = chunk_or_miss(future.result(), key, allocate, self._integrity, self._stats, self.name,
                                   f"object {name}", lambda: self._delete(name))
            if out[i] is None:
                break
        return out

    # -- store ------------------------------------------------------------------
    def put(self, key: CacheEngineKey, obj: MemoryObj, checksum: ChecksumMemo | None = None) -> bool:
        if not self._outage.usable():
            self._stats.miss("dropped", tier=self.name)
            return False
        header, payload = serde.blob_pieces(obj, key, self._integrity, checksum)
        name = self.object_key(key)
        deadline, abandoned = self._deadline(), threading.Event()
        if len(header) + payload.nbytes <= 2 * PART_BYTES:  # copied here: `obj` may be reused once we return
            job = self._pool.submit(self._client.put_object, Bucket=self.location.bucket, Key=name,
                                    Body=header + bytes(payload))
        else:
            job = self._pool.submit(self._multipart, name, header, payload, deadline, abandoned)
        try:
            self._all_by([job], deadline)
        except Exception as exc:  # noqa: BLE001
            abandoned.set()
            self._fault("PUT", exc)
            self._stats.miss("dropped", tier=self.name)
            return False
        self._outage.worked()
        self._stats.chunk_event(self.name, True, key)
        return True

    def put_many(self, keys: list[CacheEngineKey], objs: list[MemoryObj],
                 checksums: list[ChecksumMemo | None] | None = None) -> list[bool]:
        """put() of each chunk (a step's), several at once: as many as leave their
        parts room on the bounded pools (`concurrency` / parts per chunk), each with
        put()'s own whole-operation deadline. Per chunk True or False (dropped, counted)."""
        checksums = checksums or [None] * len(keys)
        if len(keys) <= 1:
            return [self.put(key, obj, memo) for key, obj, memo in zip(keys, objs, checksums)]
        parts = max(1, -(-max(obj.nbytes for obj in objs) // PART_BYTES))
        width = max(1, self.concurrency // parts)
        out: list[bool] = []
        for start in range(0, len(keys), width):
            wave = [self._putters.submit(self.put, *job) for job in
                    zip(keys[start:start + width], objs[start:start + width], checksums[start:start + width])]
            out += [job.result() for job in wave]
        return out

    def _multipart(self, name: str, header: bytes, payload: memoryview, deadline: float,
                   abandoned: threading.Event) -> None:
        """Parts of PART_BYTES uploaded in parallel; the first carries the header.
        An upload that fails, or that put() gave up on (`abandoned`: `payload` may hold
        another chunk by now), is aborted, never completed, so no part is left to pay for."""
        bucket = self.location.bucket
        upload = self._client.create_multipart_upload(Bucket=bucket, Key=name)["UploadId"]
        first = PART_BYTES - len(header)
        bounds = [(0, first)] + [(s, min(s + PART_BYTES, payload.nbytes)) for s in range(first, payload.nbytes,
                                                                                          PART_BYTES)]

        def send(number: int, start: int, end: int) -> dict:
            if abandoned.is_set():
                raise DeadlineExceeded("the put was given up")
            body = (header if number == 1 else b"") + bytes(payload[start:end])
            reply = self._client.upload_part(Bucket=bucket, Key=name, UploadId=upload, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": reply["ETag"]}

        try:
            parts = self._all_by([self._parts.submit(send, number, *bound)
                                  for number, bound in enumerate(bounds, start=1)], deadline)
            if abandoned.is_set():
                raise DeadlineExceeded("the put was given up")
            self._client.complete_multipart_upload(Bucket=bucket, Key=name, UploadId=upload,
                                                   MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=bucket, Key=name, UploadId=upload)
            except Exception:  # noqa: BLE001 - the store may be gone; its lifecycle rules clean up
                pass
            raise

    def _delete(self, name: str) -> None:
        try:
            self._client.delete_object(Bucket=self.location.bucket, Key=name)
        except Exception:  # noqa: BLE001
            pass

    def remove(self, key: CacheEngineKey) -> None:
        self._delete(self.object_key(key))
        self._stats.chunk_event(self.name, False, key)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._parts.shutdown(wait=False)
        self._putters.shutdown(wait=False)
        self._client.close()
