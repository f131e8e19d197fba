"""A private Orthanc (Debian packages orthanc + orthanc-dicomweb) for the PACS tests: its own JSON configuration and
storage folder, HTTP and DICOM on free loopback ports, HTTP authentication on; stop() and start() keep its storage.
Never the system service."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.service.conftest import free_port

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
USER, PASSWORD = "msgldm", "orthanc-test-secret"


def dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*"))
        if found:
            return found[0]
    return None


def orthanc_missing() -> str | None:
    """Why a private Orthanc cannot run here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian: orthanc-dicomweb)"
    if shutil.which("storescu") is None:
        return "storescu is not installed (Debian: dcmtk)"
    return None


@dataclass
class Orthanc:
    root: Path
    aet: str = "ORTHANC"
    lua: str | None = None  # a Lua script (e.g. a ReceivedInstanceFilter)
    modalities: dict[str, list] = field(default_factory=dict)  # DicomModalities: name -> [AET, host, port]
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=(USER, PASSWORD), timeout=30)

    def start(self) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": f"msgldm-test-{self.aet}", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": self.aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomModalities": self.modalities,
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowStore": True,
            "StableAge": 1, "HttpThreadsCount": 8, "ConcurrentJobs": 2, "SaveJobs": False,
            "LuaScripts": [str(self.root / "script.lua")] if self.lua else [],
        }
        if self.lua:
            (self.root / "script.lua").write_text(self.lua)
        (self.root / "orthanc.json").write_text(json.dumps(config, indent=1))
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(["Orthanc", str(self.root / "orthanc.json")], stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.client().get("/system").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start:\n{(self.root / 'orthanc.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def storescu(self, paths: list[Path], calling_aet: str = "STORESCU") -> None:
        out = subprocess.run(["storescu", "-aet", calling_aet, "-aec", self.aet, "127.0.0.1", str(self.dicom_port),
                              *map(str, paths)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr

    def count_instances(self) -> int:
        return int(self.client().get("/statistics").json()["CountInstances"])

    def node(self, dimse: bool = False) -> dict:
        """This Orthanc as one entry of MSGLDM_DICOM__NODES."""
        if dimse:
            return {"ae_title": self.aet, "host": "127.0.0.1", "port": self.dicom_port}
        return {"dicomweb_url": self.dicomweb, "username": USER, "password_file": str(self.root / "password")}

    def write_password(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "password").write_text(PASSWORD + "\n")
