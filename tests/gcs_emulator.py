"""A Google Cloud Storage emulator on localhost for the object-storage tests.

    python tests/gcs_emulator.py PORT BUCKET

Runs gcp-storage-emulator in memory with three additions: the objects.moveTo call (gcsfs renames
with it; without it every rename waits out retries), an object's generation in the headers of a
download (tensorstore reads it there), and quiet handling of clients that close a connection
early. `client_environment(url)` is what points every storage client at it.
"""

import socket
import socketserver
import sys
import time
import urllib.request
from http import HTTPStatus


def client_environment(url: str) -> dict[str, str]:
    """Variables that send gcsfs (epath), tensorstore (orbax), google-cloud-storage (tensorboardX)
    and array_record (grain) to the emulator without credentials, and any metadata-server lookup to
    a closed local port."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        # gcsfs otherwise asks a gRPC endpoint what kind of bucket it is, which the emulator lacks.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "GOOGLE_CLOUD_PROJECT": "emulator",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "GCE_METADATA_HOST": "127.0.0.1:9",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as response:
                if response.read() == b"OK":
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _add_move_and_quiet_disconnects() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def move(request, response, storage, *args, **kwargs):
        params = request.params
        try:
            moved = objects._copy(request.base_url, storage, params["bucket_name"], params["object_id"],
                                  params["bucket_name"], params["dest_object_id"])
            storage.delete_file(params["bucket_name"], params["object_id"])
            response.json(moved)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND

    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain_download(request, response, storage, *args, **kwargs)
        try:  # tensorstore (orbax) reads an object's generation from this header
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except NotFound:
            pass

    route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
             {server.POST: move})
    objects.download = download  # objects.get serves ?alt=media through it
    handlers = [(pattern, {method: download if handler is plain_download else handler
                           for method, handler in methods.items()}) for pattern, methods in server.HANDLERS]
    server.HANDLERS = (route, *handlers)
    handle_error = socketserver.BaseServer.handle_error

    def quiet(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            handle_error(self, request, client_address)

    socketserver.BaseServer.handle_error = quiet


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    _add_move_and_quiet_disconnects()
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main()
