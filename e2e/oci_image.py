#!/usr/bin/env python3
"""Writes the crosstrace container image as an OCI image layout, without a container engine, deterministically.

The same binaries and the same arguments give the same bytes, hence the same digest: every tar entry has
a fixed owner, mode and mtime (the commit time) in a fixed order; gzip writes no name and mtime 0; the JSON
documents have sorted keys and no spaces; nothing reads the clock or the machine. One layer per image: the
static binary at /crosstrace; /etc/passwd, /etc/group and /home/nonroot for the non-root user 65532 it runs
as; /etc/nsswitch.conf, which has the binary's built-in glibc read /etc/hosts before DNS; and /tmp. One
platform gives an image manifest; several give an image index of one manifest per platform. Either is the
single entry of the layout's index.json, tagged with the version, which is what `crane push DIR REF` pushes.

    e2e/oci_image.py --out DIR [--tar FILE] --binary linux/amd64=PATH [--binary linux/arm64=PATH ...]
        --version 0.1.0 --revision 1a2b3c4d5e6f --created-epoch 1764540000 --source https://...

Prints the digest of what it wrote (the one a registry will report after the push).
Python standard library only.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile

USER = "65532:65532"
ENTRYPOINT = "/crosstrace"
LICENSE = "Apache-2.0"

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# The platforms the writer knows: OCI architecture and variant per GOARCH-style name.
PLATFORMS = {
    "linux/amd64": {"os": "linux", "architecture": "amd64"},
    "linux/arm64": {"os": "linux", "architecture": "arm64", "variant": "v8"},
}

PASSWD = b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = b"root:x:0:\nnonroot:x:65532:\n"
# glibc's default without this file is "dns [!UNAVAIL=return] files": /etc/hosts (the pod's host aliases)
# would be read only when no DNS server answers.
NSSWITCH = b"hosts: files dns\n"


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Blobs:
    """The layout's blobs/sha256 directory: content-addressed, each written once."""

    def __init__(self, root):
        self.dir = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.dir)

    def put(self, media_type, data, **extra):
        digest = sha256(data)
        with open(os.path.join(self.dir, digest.split(":", 1)[1]), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def tar_entry(name, mtime, mode, kind=tarfile.REGTYPE, size=0, uid=0, gid=0):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, mtime
    info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
    return info


def layer_tar(binary, mtime):
    """The uncompressed layer: directories before their files, in sorted order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        with open(binary, "rb") as f:
            program = f.read()
        files = {
            "crosstrace": (0o755, program),
            "etc/group": (0o644, GROUP),
            "etc/nsswitch.conf": (0o644, NSSWITCH),
            "etc/passwd": (0o644, PASSWD),
        }
        dirs = {"etc/": (0o755, 0), "home/": (0o755, 0), "home/nonroot/": (0o700, 65532), "tmp/": (0o1777, 0)}
        for name in sorted(set(files) | set(dirs)):
            if name in dirs:
                mode, owner = dirs[name]
                tar.addfile(tar_entry(name, mtime, mode, tarfile.DIRTYPE, uid=owner, gid=owner))
            else:
                mode, data = files[name]
                tar.addfile(tar_entry(name, mtime, mode, size=len(data)), io.BytesIO(data))
    return out.getvalue()


def gzip_bytes(data):
    out = io.BytesIO()
    # No file name, mtime 0: the header depends on nothing but the content.
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def write_image(blobs, platform, binary, labels, created, mtime):
    tar = layer_tar(binary, mtime)
    layer = blobs.put(LAYER, gzip_bytes(tar))
    config = {
        **PLATFORMS[platform],
        "created": created,
        "config": {
            "User": USER,
            "Entrypoint": [ENTRYPOINT],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "history": [{"created": created, "created_by": "e2e/oci_image.py"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": blobs.put(CONFIG, canonical_json(config)),
        "layers": [layer],
        "annotations": {k: v for k, v in labels.items() if k in ("org.opencontainers.image.created",
                                                                  "org.opencontainers.image.revision")},
    }
    return blobs.put(MANIFEST, canonical_json(manifest), platform=PLATFORMS[platform])


def write_tar(layout, path):
    """The layout as one tar archive, as deterministic as the layout itself."""
    tmp = path + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        names = []
        for top, dirs, files in os.walk(layout):
            dirs.sort()
            rel = os.path.relpath(top, layout)
            if rel != ".":
                names.append((rel + "/", None))
            names.extend((os.path.normpath(os.path.join(rel, f)), os.path.join(top, f)) for f in sorted(files))
        for name, source in sorted(names):
            if source is None:
                tar.addfile(tar_entry(name, 0, 0o755, tarfile.DIRTYPE))
            else:
                with open(source, "rb") as f:
                    data = f.read()
                tar.addfile(tar_entry(name, 0, 0o644, size=len(data)), io.BytesIO(data))
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the OCI layout directory (replaced)")
    parser.add_argument("--tar", help="also write the layout as this tar archive")
    parser.add_argument("--binary", action="append", required=True, metavar="PLATFORM=PATH",
                        help=f"a static crosstrace binary for one platform ({', '.join(PLATFORMS)})")
    parser.add_argument("--version", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--created-epoch", required=True, type=int, help="the commit time, seconds since 1970")
    parser.add_argument("--source", required=True, help="the source repository URL")
    parser.add_argument("--ref-name", help="org.opencontainers.image.ref.name in index.json (default: --version)")
    args = parser.parse_args()

    binaries = {}
    for spec in args.binary:
        platform, sep, path = spec.partition("=")
        if not sep or platform not in PLATFORMS:
            parser.error(f"--binary {spec}: want PLATFORM=PATH with PLATFORM one of {', '.join(PLATFORMS)}")
        if platform in binaries:
            parser.error(f"--binary {platform} given twice")
        binaries[platform] = path

    created = datetime.datetime.fromtimestamp(args.created_epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = {
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.description": "Cross-layer tracing for Kubernetes: the operator and its node agent",
        "org.opencontainers.image.licenses": LICENSE,
        "org.opencontainers.image.revision": args.revision,
        "org.opencontainers.image.source": args.source,
        "org.opencontainers.image.title": "crosstrace",
        "org.opencontainers.image.version": args.version,
    }

    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    blobs = Blobs(tmp)
    manifests = [write_image(blobs, p, binaries[p], labels, created, args.created_epoch) for p in sorted(binaries)]
    if len(manifests) == 1:
        top = manifests[0]
    else:
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests,
                 "annotations": {"org.opencontainers.image.created": created,
                                 "org.opencontainers.image.revision": args.revision}}
        top = blobs.put(INDEX, canonical_json(index))
    top = dict(top, annotations={"org.opencontainers.image.ref.name": args.ref_name or args.version})
    with open(os.path.join(tmp, "oci-layout"), "wb") as f:
        f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
    with open(os.path.join(tmp, "index.json"), "wb") as f:
        f.write(canonical_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": [top]}))
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    if args.tar:
        write_tar(args.out, args.tar)
    print(top["digest"])


if __name__ == "__main__":
    sys.exit(main())
