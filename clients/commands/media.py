"""`sysdesign media …`: resumable uploads with a progress bar, watch, get, list, delete.

An upload keeps a small resume record (upload id, server, file size and
mtime) under ``$XDG_CACHE_HOME/sysdesign/uploads/``; run the same command
again after an interruption (Ctrl-C, a lost connection, a server restart) and
it asks the server for the committed offset (GetUpload) and sends only the
rest. Within one run, a broken stream is resumed the same way automatically.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table as RichTable

from clients.common import (
    TokenOpt,
    UserOpt,
    _rpc,
    _token,
    console,
    err,
    id_column,
    parse_env,
    rpc_fail,
)

media_app = typer.Typer(help="Upload, watch and play videos and images.", no_args_is_help=True)

CHUNK = 1 << 20
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
STATE_NAMES = {0: "UNSPECIFIED", 1: "UPLOADING", 2: "PROCESSING", 3: "READY", 4: "FAILED"}


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def guess_content_type(path: Path) -> str:
    ctype, _ = mimetypes.guess_type(path.name)
    return ctype or "application/octet-stream"


def chunks(path: Path, upload_id: str, offset: int, chunk_size: int = CHUNK,
           on_bytes: Callable[[int], None] | None = None, stop_after: int | None = None,
           limit_rate: int = 0) -> Iterator[Any]:
    """UploadRequest messages for the file from ``offset`` (``stop_after`` bytes at most),
    at most ``limit_rate`` bytes per second when it is set."""
    from sysdesign.media.v1 import media_pb2 as pb

    sent = 0
    started = time.monotonic()
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            want = chunk_size if stop_after is None else min(chunk_size, stop_after - sent)
            data = f.read(want) if want > 0 else b""
            if not data:
                if not sent:  # every byte is committed: an empty message asks to finish
                    yield pb.UploadRequest(upload_id=upload_id, offset=offset, data=b"")
                return
            if limit_rate:
                ahead = sent / limit_rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            yield pb.UploadRequest(upload_id=upload_id, offset=offset + sent, data=data)
            sent += len(data)
            if on_bytes:
                on_bytes(len(data))


def send_file(stub: Any, metadata: Any, path: Path, upload: Any, *,
              on_committed: Callable[[int], None] | None = None,
              on_bytes: Callable[[int], None] | None = None,
              chunk_size: int = CHUNK, max_retries: int = 30, limit_rate: int = 0) -> Any:
    """Stream the rest of ``path`` into ``upload`` until the server has every byte.

    Each stream starts at the committed offset; when it ends early (the server
    bounds a stream's duration, a connection drops) the next one starts from
    the committed offset the server reports. Returns the final Upload.
    """
    from sysdesign.media.v1 import media_pb2 as pb

    retries = 0
    while upload.state == pb.MEDIA_STATE_UPLOADING:
        if on_committed:
            on_committed(upload.committed_bytes)
        try:
            upload = stub.Upload(chunks(path, upload.upload_id, upload.committed_bytes, chunk_size, on_bytes,
                                        limit_rate=limit_rate),
                                 metadata=metadata, timeout=600).upload
            retries = 0
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or retries >= max_retries:  # type: ignore[attr-defined]
                raise
            retries += 1
            time.sleep(min(0.2 * 2 ** retries, 5.0))
            upload = stub.GetUpload(pb.GetUploadRequest(upload_id=upload.upload_id), metadata=metadata,
                                    timeout=30).upload
    if on_committed:
        on_committed(upload.committed_bytes)
    return upload


def _records_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sysdesign" / "uploads"


def _record_path(path: Path, target: str) -> Path:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{target}"
    return _records_dir() / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json")


@media_app.command("upload")
def upload_cmd(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A video or image file.")],
    content_type: Annotated[str, typer.Option(help="Declared type (default: from the extension).")] = "",
    watch: Annotated[bool, typer.Option(help="Follow transcoding until READY or FAILED.")] = True,
    chunk_size: Annotated[int, typer.Option(help="Bytes per message.")] = CHUNK,
    limit_rate: Annotated[int, typer.Option(help="At most this many bytes per second (0: no limit).")] = 0,
    token: TokenOpt = None,
    user: UserOpt = None,
) -> None:
    """Upload FILE with a progress bar; rerun the same command to resume an interrupted upload."""
    from sysdesign.media.v1 import media_pb2 as pb
    from sysdesign.media.v1 import media_pb2_grpc as pbg

    from clients.sdk import bearer, channel, grpc_target

    md = bearer(_token(token, user))
    size = file.stat().st_size
    record = _record_path(file, grpc_target())
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with channel() as ch:
        stub = pbg.MediaServiceStub(ch)
        upload = None
        if record.exists():
            try:
                saved = json.loads(record.read_text())
                upload = stub.GetUpload(pb.GetUploadRequest(upload_id=saved["upload_id"]), metadata=md,
                                        timeout=30).upload
                err.print(f"resuming upload {upload.upload_id} at {upload.committed_bytes:,} of {size:,} bytes")
            except (grpc.RpcError, ValueError, KeyError):
                upload = None
        if upload is None:
            with Progress(*columns, console=err, transient=True) as progress:
                task = progress.add_task("hashing", total=size)
                digest = sha256_file(file, lambda n: progress.advance(task, n))
            upload = _rpc(stub.CreateUpload, pb.CreateUploadRequest(
                filename=file.name, content_type=content_type or guess_content_type(file),
                size_bytes=size, sha256=digest), metadata=md).upload
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"upload_id": upload.upload_id, "file": str(file.resolve())}))
        try:
            with Progress(*columns, console=err) as progress:
                task = progress.add_task("uploading", total=size, completed=upload.committed_bytes)
                upload = send_file(
                    stub, md, file, upload, chunk_size=chunk_size, limit_rate=limit_rate,
                    on_committed=lambda n: progress.update(task, completed=n),
                    on_bytes=lambda n: progress.advance(task, n),
                )
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE:  # type: ignore[attr-defined]
                record.unlink(missing_ok=True)  # refused: the server removed it
            rpc_fail(e)
        record.unlink(missing_ok=True)
    err.print(f"uploaded {file.name}: media {upload.media_id} ({STATE_NAMES.get(upload.state, upload.state)})")
    print(upload.media_id)
    if watch:
        watch_cmd(upload.media_id, token=token, user=user)


@media_app.command("watch")
def watch_cmd(media_id: str, token: TokenOpt = None, user: UserOpt = None) -> None:
    """Follow a media item's processing until READY or FAILED."""
    from sysdesign.media.v1 import media_pb2 as pb
    from sysdesign.media.v1 import media_pb2_grpc as pbg

    from clients.sdk import bearer, channel

    md = bearer(_token(token, user))
    last = None
    with channel() as ch, Progress(TextColumn("{task.description}"), BarColumn(),
                                   TextColumn("{task.percentage:>3.0f}%"), console=err) as progress:
        task = progress.add_task("processing", total=100)
        try:
            for resp in pbg.MediaServiceStub(ch).WatchMedia(pb.WatchMediaRequest(media_id=media_id),
                                                           metadata=md, timeout=24 * 3600):
                last = resp.media
                progress.update(task, completed=last.progress_percent if last.state != pb.MEDIA_STATE_READY
                                else 100, description=STATE_NAMES.get(last.state, "?").lower())
        except grpc.RpcError as e:
            progress.stop()
            rpc_fail(e)
    if last is None:
        raise typer.Exit(1)
    if last.state == pb.MEDIA_STATE_FAILED:
        err.print(f"[red]FAILED[/]: {last.failure_reason}")
        raise typer.Exit(1)
    err.print(f"[green]READY[/] in {last.processing_duration.ToMilliseconds() / 1000:.1f}s")
    print(last.playback.hls_url or last.playback.poster_url)


@media_app.command("get")
def get_cmd(media_id: str, token: TokenOpt = None, user: UserOpt = None) -> None:
    """Metadata and the playback URL (open it in ffplay, VLC or a browser HLS player)."""
    from sysdesign.media.v1 import media_pb2 as pb
    from sysdesign.media.v1 import media_pb2_grpc as pbg

    from clients.sdk import bearer, channel

    with channel() as ch:
        m = _rpc(pbg.MediaServiceStub(ch).GetMedia, pb.GetMediaRequest(media_id=media_id),
                 metadata=bearer(_token(token, user))).media
    t = RichTable("", id_column("", min_width=1), show_header=False, title=f"media {m.media_id}",
                  title_justify="left")
    t.add_row("file", f"{m.filename} ({m.content_type}, {m.size_bytes:,} bytes)")
    t.add_row("state", STATE_NAMES.get(m.state, "?") + (f" {m.progress_percent}%" if m.state == 2 else "")
              + (f": {m.failure_reason}" if m.failure_reason else ""))
    if m.width:
        dur = f", {m.duration.ToMilliseconds() / 1000:.2f}s" if m.HasField("duration") else ""
        t.add_row("source", f"{m.width}x{m.height}{dur}{', audio' if m.has_audio else ''}")
    for v in m.variants:
        bw = f" {v.bandwidth_bps / 1000:.0f} kb/s" if v.bandwidth_bps else ""
        t.add_row(v.name, f"{v.width}x{v.height}{bw}  {v.url}")
    if m.playback.poster_url:
        t.add_row("poster", m.playback.poster_url)
    err.print(t)
    url = m.playback.hls_url or m.playback.poster_url
    if url:
        print(url)


@media_app.command("list")
def list_cmd(page_size: int = 20, token: TokenOpt = None, user: UserOpt = None) -> None:
    """Your media, newest first."""
    from sysdesign.media.v1 import media_pb2 as pb
    from sysdesign.media.v1 import media_pb2_grpc as pbg

    from clients.sdk import bearer, channel

    with channel() as ch:
        resp = _rpc(pbg.MediaServiceStub(ch).ListMedia, pb.ListMediaRequest(page_size=page_size),
                    metadata=bearer(_token(token, user)))
    t = RichTable(id_column("id"), id_column("file", min_width=4), "state", "size")
    for m in resp.media:
        t.add_row(m.media_id, m.filename, STATE_NAMES.get(m.state, "?"), f"{m.size_bytes:,}")
    console.print(t)


@media_app.command("delete")
def delete_cmd(media_id: str, token: TokenOpt = None, user: UserOpt = None) -> None:
    """Delete one of your media items and every rendition."""
    from sysdesign.media.v1 import media_pb2 as pb
    from sysdesign.media.v1 import media_pb2_grpc as pbg

    from clients.sdk import bearer, channel

    with channel() as ch:
        _rpc(pbg.MediaServiceStub(ch).DeleteMedia, pb.DeleteMediaRequest(media_id=media_id),
             metadata=bearer(_token(token, user)))
    err.print(f"deleted {media_id}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(media_app, name="media")

    @bench_app.command("media")
    def bench_media(
        quick: Annotated[bool, typer.Option(help="A 64 MiB upload instead of 1 GiB, shorter videos.")] = False,
        out: Annotated[Path, typer.Option(help="Where the JSON, Markdown and PNG results go.")] = Path("bench-results"),
        upload_mib: Annotated[int | None, typer.Option(help="Upload size in MiB (default 1024; 64 with --quick).")] = None,
        keep_data: Annotated[bool, typer.Option(help="Keep the stack's data dir and log.")] = False,
        env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the stack, repeatable.")] = None,
    ) -> None:
        """Media: upload throughput vs a raw blob write, transcode vs bare ffmpeg, server RSS."""
        from clients.bench.media import MediaBenchOptions, main

        extra = parse_env(env)
        raise typer.Exit(main(MediaBenchOptions(quick=quick, out_dir=out, upload_mib=upload_mib,
                                                keep_data=keep_data, extra_env=extra)))
