"""`python -m tests.gcs_emulator start ...`: gcp-storage-emulator's command line (a GCS stand-in on
loopback for tests/e2e/test_gcs_workdir.py), with one gap of its media downloads filled.

GCS answers an object download with the object's generation in the `x-goog-generation` header;
tensorstore, which orbax writes checkpoint arrays with, reads it from there (without it: "Malformed
StorageGeneration" as soon as an OCDBT manifest is read back). gcp-storage-emulator 2026.7.19 leaves
the header out; the download handler below adds it (and `x-goog-metageneration`) from the object's
own record. Everything else is the emulator as released.
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download  # before the server module is imported: its routes take objects.download then

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
