"""s3://bucket/prefix: the cold tier on an S3-compatible object store (AWS S3,
MinIO, Ceph RGW, SeaweedFS) through boto3 (`pip install lmcache[s3]`).

One chunk is one object, `<prefix><key string>`, holding the serde blob unchanged
(the header checks apply as on every tier). Credentials come from boto3's usual
chain (AWS_* variables, ~/.aws files, instance roles) and are never logged; a
non-AWS store is named by the config key s3_endpoint_url (path-style addressing).

Costs: a lookup of n chunks is HEAD requests sent in waves of `concurrency`, in
parallel, stopping at the first wave with a miss (so ceil(hits / concurrency) + 1
round trips at most); a large chunk is written as a multipart upload of parallel
parts and read as parallel ranged GETs. The store being down or slow is a miss,
one log line per outage and a back-off (outage.py); any other error is a miss
logged once per kind. Nothing is remembered about which objects exist.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from lmcache.v1.memory import MemoryObj
from lmcache.v1.remote_urls import parse_s3
from lmcache.v1.storage_backend import serde
from lmcache.v1.storage_backend.outage import Outage
from lmcache.v1.storage_backend.serde import Allocator, ChecksumMemo, SerdeError
from lmcache.v1.storage_backend.stats import EngineStats
from lmcache.v1.token_database import CacheEngineKey

logger = logging.getLogger(__name__)
PART_BYTES = 8 * 2**20  # multipart part / ranged read size (S3's minimum part is 5 MiB)
_ABSENT = {"404", "NoSuchKey", "NotFound"}


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
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lmcache-s3")
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

    def prefix_count(self, keys: list[CacheEngineKey]) -> int:
        n = 0
        while n < len(keys) and self._outage.usable():
            wave = [self.object_key(k) for k in keys[n:n + self.concurrency]]
            found = list(self._pool.map(self._head, wave))
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

    def _fetch(self, name: str) -> bytes | bytearray | None:
        try:
            first = self._client.get_object(Bucket=self.location.bucket, Key=name, Range=f"bytes=0-{PART_BYTES - 1}")
            head = first["Body"].read()
            total = int(first.get("ContentRange", "/%d" % len(head)).rsplit("/", 1)[1])
            if total <= len(head):
                return head
            blob = bytearray(total)
            blob[:len(head)] = head
            starts = range(len(head), total, PART_BYTES)
            for start, data in self._pool.map(lambda s: self._range(name, s, min(s + PART_BYTES, total)), starts):
                blob[start:start + len(data)] = data
            return blob
        except Exception as exc:  # noqa: BLE001
            if self._code(exc) in _ABSENT or self._code(exc) == "InvalidRange":  # InvalidRange: an empty object
                return b"" if self._code(exc) == "InvalidRange" else None
            raise

    def get(self, key: CacheEngineKey, allocate: Allocator) -> MemoryObj | None:
        if not self._outage.usable():
            return None
        name = self.object_key(key)
        try:
            blob = self._fetch(name)
        except Exception as exc:  # noqa: BLE001
            self._fault("GET", exc)
            return None
        self._outage.worked()
        if blob is None:
            self._stats.miss("absent")
            return None
        try:
            obj = serde.from_bytes(blob, allocate, key, self._integrity)
        except SerdeError as exc:
            logger.warning("remote tier: object %s is not a valid chunk (%s): treated as a miss and deleted", name, exc)
            self._stats.miss(serde.miss_cause(exc), tier=self.name)
            self._stats.chunk_event(self.name, False, key)
            self._delete(name)
            return None
        if obj is None:
            self._stats.miss("dropped", tier=self.name)
        return obj

    # -- store ------------------------------------------------------------------
    def put(self, key: CacheEngineKey, obj: MemoryObj, checksum: ChecksumMemo | None = None) -> bool:
        if not self._outage.usable():
            self._stats.miss("dropped", tier=self.name)
            return False
        header, payload = serde.blob_pieces(obj, key, self._integrity, checksum)
        name = self.object_key(key)
        try:
            if len(header) + payload.nbytes <= 2 * PART_BYTES:
                self._client.put_object(Bucket=self.location.bucket, Key=name, Body=header + bytes(payload))
            else:
                self._multipart(name, header, payload)
        except Exception as exc:  # noqa: BLE001
            self._fault("PUT", exc)
            self._stats.miss("dropped", tier=self.name)
            return False
        self._outage.worked()
        self._stats.chunk_event(self.name, True, key)
        return True

    def _multipart(self, name: str, header: bytes, payload: memoryview) -> None:
        """Parts of PART_BYTES uploaded in parallel; the first carries the header.
        An upload that fails is aborted, so no part is left behind to pay for."""
        bucket = self.location.bucket
        upload = self._client.create_multipart_upload(Bucket=bucket, Key=name)["UploadId"]
        first = PART_BYTES - len(header)
        bounds = [(0, first)] + [(s, min(s + PART_BYTES, payload.nbytes)) for s in range(first, payload.nbytes,
                                                                                          PART_BYTES)]

        def send(numbered):
            number, (start, end) = numbered
            body = (header if number == 1 else b"") + bytes(payload[start:end])
            reply = self._client.upload_part(Bucket=bucket, Key=name, UploadId=upload, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": reply["ETag"]}

        try:
            parts = list(self._pool.map(send, enumerate(bounds, start=1)))
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
        self._client.close()
