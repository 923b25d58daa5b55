"""Public cohorts where they live: a card with ``storage: {anonymous: true, endpoint: ...}`` is
ingested from the local S3 server with unsigned requests only, through the card's own endpoint,
while credentials sit in the environment (a recording proxy on loopback sees every request); the
shipped ABIDE Preprocessed card reads a generated copy of that bucket's layout and file formats."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import threading
from urllib.parse import urlparse

import pytest
import yaml

from fmrilm import storage
from fmrilm.data.ingest import ingest_card
from tests.test_ingest import make_cohort


class RecordingProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to ``target`` (host:port) and records its method, path and whether it was signed."""

    def __init__(self, target: str):
        self.target, self.seen = target, []
        super().__init__(("127.0.0.1", 0), ProxyHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, "Authorization" in self.headers or "X-Amz-Security-Token" in self.headers))
        conn = http.client.HTTPConnection(self.server.target, timeout=10)
        conn.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def _upload(local_root, prefix: str) -> None:
    for dirpath, _, files in os.walk(local_root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_root).replace(os.sep, "/")
            storage.write_bytes(storage.resolve(f"{prefix}/{rel}"), open(path, "rb").read())


@pytest.fixture
def proxy(local_s3):
    server = RecordingProxy(urlparse(local_s3.endpoint).netloc)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_a_public_bucket_is_read_unsigned_through_the_cards_endpoint(tmp_path, local_s3, proxy, monkeypatch):
    monkeypatch.setenv(storage.BUCKETS_ENV, "{}")  # restored after the test
    src = tmp_path / "src"
    src.mkdir()
    card = yaml.safe_load(open(make_cohort(src)))
    prefix = local_s3.uri("public-cohort")
    _upload(src, prefix)  # signed, with the environment's credentials
    assert os.environ.get("AWS_ACCESS_KEY_ID")  # credentials are present, and must not be sent below
    card |= {"root": f"{prefix}/derivatives", "storage": {"anonymous": True, "endpoint": proxy.endpoint}}
    card["phenotypes"]["file"] = f"{prefix}/participants.tsv"
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump(card))

    result = ingest_card(str(path), str(tmp_path / "store"), use_ray=False)
    assert result.written and result.manifest["rows"] == 4
    assert any(method == "GET" for method, _, _ in proxy.seen)  # the card's endpoint carried the reads
    assert [r for r in proxy.seen if r[2]] == []  # none of them signed
    assert json.loads(os.environ[storage.BUCKETS_ENV]) == {local_s3.bucket: {"anonymous": True, "endpoint": proxy.endpoint}}


def test_bucket_options_refuse_endpoints_with_credentials_and_bad_json(monkeypatch):
    monkeypatch.setenv(storage.BUCKETS_ENV, "{}")
    with pytest.raises(storage.StorageError, match=r"embeds credentials") as err:
        storage.configure_bucket("s3://b/x", endpoint="http://KEY:SECRET@127.0.0.1:9")
    assert "SECRET" not in str(err.value)
    storage.configure_bucket("s3://pub/x", anonymous=True)
    opts = storage.resolve("s3://pub/a").fs.__reduce__()[1][0]
    assert opts["anonymous"] is True and storage.resolve("s3://other/a").fs.__reduce__()[1][0]["anonymous"] is False
    monkeypatch.setenv(storage.BUCKETS_ENV, "not json")
    with pytest.raises(storage.StorageError, match="FMRILM_S3_BUCKETS is not a JSON object"):
        storage.resolve("s3://pub/a")


ABIDE = "abide/data/Projects/ABIDE_Initiative"
PHENO_COLUMNS = "SUB_ID,FILE_ID,SITE_ID,DX_GROUP,AGE_AT_SCAN,SEX,FIQ,func_mean_fd"
ROWS = [  # SUB_ID, FILE_ID, SITE_ID, DX_GROUP, AGE, SEX, FIQ, mean FD
    ("50003", "Pitt_0050003", "PITT", "1", "24.45", "1", "124", "0.12"),
    ("50004", "Pitt_0050004", "PITT", "2", "19.09", "2", "113", "0.35"),
    ("50952", "NYU_0050952", "NYU", "2", "9.3", "1", "", "0.08"),
    ("50007", "no_filename", "PITT", "1", "20.1", "1", "110", "0.1"),  # not preprocessed
    ("50010", "Pitt_0050010", "PITT", "1", "30.0", "1", "99", "0.1"),  # listed, but its file is not in the bucket
    ("60001", "Moon_0060001", "MOON", "2", "12.0", "2", "100", "0.1"),  # a site with no TR in the card
]


def make_abide_copy(local_s3, n_rois=6, n_t=40) -> str:
    """A small copy of the ABIDE Preprocessed layout and file formats on the local S3 server;
    returns its root URI."""
    import numpy as np

    root = local_s3.uri(ABIDE)
    table = PHENO_COLUMNS + "\n" + "".join(",".join(r) + "\n" for r in ROWS)
    storage.write_text(storage.resolve(f"{root}/Phenotypic_V1_0b_preprocessed1.csv"), table)
    header = "\t".join(f"#{2001 + i}" for i in range(n_rois))
    for k, (_, file_id, *_) in enumerate(ROWS):
        if file_id in ("no_filename", "Pitt_0050010"):
            continue
        ts = np.random.default_rng(k).normal(size=(n_t, n_rois))
        body = header + "\n" + "\n".join("\t".join(f"{v:.6f}" for v in row) for row in ts) + "\n"
        storage.write_text(storage.resolve(f"{root}/Outputs/cpac/filt_noglobal/rois_cc200/{file_id}_rois_cc200.1D"), body)
    return root


def test_the_abide_card_ingests_the_pcp_layout_from_a_public_bucket(tmp_path, local_s3, proxy, monkeypatch):
    from fmrilm.data.cards import load_card
    from fmrilm.data.readers import discover

    monkeypatch.setenv(storage.BUCKETS_ENV, "{}")
    root = make_abide_copy(local_s3)
    card = os.path.join(os.path.dirname(__file__), os.pardir, "datasets", "abide_pcp_cc200.yaml")
    overrides = [f"root={root}", f"phenotypes.file={root}/Phenotypic_V1_0b_preprocessed1.csv", f"storage.endpoint={proxy.endpoint}"]
    sources, report = discover(load_card(card, overrides))
    assert report["no_filename_rows"] == 1 and report["no_filename_examples"] == ["50007"]
    assert sorted(s.scan_id for s in sources) == ["abide-pcp-cc200_sub-50003_task-rest", "abide-pcp-cc200_sub-50004_task-rest",
                                                   "abide-pcp-cc200_sub-50010_task-rest", "abide-pcp-cc200_sub-50952_task-rest",
                                                   "abide-pcp-cc200_sub-60001_task-rest"]

    result = ingest_card(card, str(tmp_path / "store"), overrides=overrides, quarantine=True, use_ray=False)
    m = result.manifest
    assert m["rows"] == 3 and m["roi_labels"] == [str(2001 + i) for i in range(6)] and m["atlas"] == "CC200"
    assert m["tr"] == [1.5, 2.0] and m["sites"] == {"NYU": 1, "PITT": 2}
    reasons = {q["scan_id"]: q["reason"] for q in m["quarantined"]}
    assert "Pitt_0050010_rois_cc200.1D is not in" in reasons["abide-pcp-cc200_sub-50010_task-rest"]
    assert "no TR for site 'MOON': add it to abide.site_tr" in reasons["abide-pcp-cc200_sub-60001_task-rest"]
    from fmrilm.data import table

    meta = table.read_meta(*table.find_datasets(str(tmp_path / "store"))[0]).to_pandas().set_index("subject_id")
    assert meta.loc["50003", "sex"] == "M" and meta.loc["50003", "diagnosis"] == "Autism" and meta.loc["50004", "diagnosis"] == "Control"
    assert meta.loc["50003", "age"] == pytest.approx(24.45) and meta.loc["50952", "tr"] == 2.0
    assert dict(meta.loc["50004", "phenotypes"]) == {"mean_fd": "0.35", "FIQ": "113"}
    assert [r for r in proxy.seen if r[2]] == []  # every request unsigned

    censored = ingest_card(card, str(tmp_path / "store2"), overrides=[*overrides, "motion.max_mean_fd=0.2"], quarantine=True, use_ray=False)
    motion = censored.manifest["motion_report"]
    assert censored.manifest["rows"] == 2 and motion["censored"] == 1 and motion["censored_scans"][0]["mean_fd"] == 0.35


def test_every_shipped_card_validates_and_public_ones_are_unsigned(monkeypatch):
    from fmrilm.data.cards import load_card

    monkeypatch.setenv(storage.BUCKETS_ENV, "{}")
    folder = os.path.join(os.path.dirname(__file__), os.pardir, "datasets")
    cards = {name: load_card(os.path.join(folder, name)) for name in sorted(os.listdir(folder)) if name.endswith(".yaml")}
    assert {"abide_pcp_cc200.yaml", "openneuro_fmriprep.yaml", "hcp_cifti.yaml"} <= set(cards)
    assert {c.format for c in cards.values()} == {"nifti", "cifti", "arrays", "abide_pcp"}
    buckets = json.loads(os.environ[storage.BUCKETS_ENV])
    assert {"fcp-indi", "openneuro-derivatives", "templateflow", "openneuro.org"} <= set(buckets)
    assert "hcp-openaccess" not in buckets  # the user's own keys there


def test_a_subject_named_by_a_folder_is_found_in_the_path(tmp_path):
    """HCP-style layouts name the subject in a folder, not the file name."""
    import numpy as np

    from fmrilm.data.cards import DatasetCard
    from fmrilm.data.readers import discover

    for sub in ("100307", "100408"):
        d = tmp_path / sub / "MNINonLinear" / "Results" / "rfMRI_REST1_LR"
        d.mkdir(parents=True)
        np.save(d / "series.npy", np.zeros((20, 3)))
    card = DatasetCard(name="hcpish", format="arrays", root=str(tmp_path), glob="*/MNINonLinear/Results/*/series.npy", tr=0.72,
                       entity_pattern=r"(?P<subject>[0-9]{6})/MNINonLinear/Results/rfMRI_(?P<task>REST)(?P<run>[12])_", atlas={"name": "x"})
    sources, _ = discover(card)
    assert [(s.subject_id, s.task, s.run, s.problem) for s in sources] == [("100307", "REST", "1", None), ("100408", "REST", "1", None)]


def test_fmriprep_derivatives_with_confounds_are_read_from_an_anonymous_bucket(tmp_path, local_s3, proxy, monkeypatch):
    """The OpenNeuro route: BIDS fMRIPrep images, their confounds tables and the atlas on a public
    bucket, read unsigned; the confounds are regressed and each scan's mean FD recorded."""
    from tests.test_nifti import make_bids

    monkeypatch.setenv(storage.BUCKETS_ENV, "{}")
    src = tmp_path / "src"
    src.mkdir()
    card = yaml.safe_load(open(make_bids(src, confounds=True)[0]))
    for tsv in (src / "fmriprep").rglob("*confounds_timeseries.tsv"):
        lines = tsv.read_text().splitlines()
        tsv.write_text("\n".join(f"{line}\t{v}" for line, v in zip(lines, ["framewise_displacement", "n/a"] + ["0.2"] * len(lines))) + "\n")
    prefix = local_s3.uri("openneuro-copy")
    _upload(src, prefix)
    card |= {"root": f"{prefix}/fmriprep", "storage": {"anonymous": True, "endpoint": proxy.endpoint}}
    card["atlas"]["labels_img"] = f"{prefix}/{card['atlas']['labels_img']}"
    card["phenotypes"]["file"] = f"{prefix}/participants.tsv"
    path = tmp_path / "openneuro.yaml"
    path.write_text(yaml.safe_dump(card))
    result = ingest_card(str(path), str(tmp_path / "store"), use_ray=False)
    assert result.manifest["rows"] == 3 and [r for r in proxy.seen if r[2]] == []
    from fmrilm.data import table

    meta = table.read_meta(*table.find_datasets(str(tmp_path / "store"))[0]).to_pandas()
    assert {dict(p)["mean_fd"] for p in meta["phenotypes"]} == {"0.2"}
