"""End to end in a real browser: headless Chromium (Debian chromium + chromium-driver, driven by Selenium) opens the
generated HTML report and the MLflow UI served on 127.0.0.1 over the fixture store of test_report.py, finds the
sweep's runs and the report's plots, and saves screenshots (under the test's tmp dir and copied to
$QLLM_SCREENS_DIR, default /tmp/q/screens)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from qllm.report import build_report

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENS = Path(os.environ.get("QLLM_SCREENS_DIR", "/tmp/q/screens"))
WAIT_S = 60
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1000"]


def _ensure_chromium() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium "
                    "chromium-driver, or make browser-deps as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:  # stale package lists: update once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"apt-get install chromium chromium-driver failed: {proc.stderr[-500:]}")


@pytest.fixture(scope="module")
def browser():
    _ensure_chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qllm-chromium-")
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """The fixture store of test_report.py and the report of its sweep S1 (logged to MLflow)."""
    from test_report import build_store

    root = tmp_path_factory.mktemp("browser")
    store = build_store(root)
    rep = build_report(tracking_uri=store.uri, sweep_ids=["S1"], out=root / "report", n_boot=200)
    return root, store, rep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(reported):
    root, store, _ = reported
    port = _free_port()
    log = open(root / "mlflow_ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlruns/mlflow.db",
                             "--default-artifact-root", str(root / "mlruns" / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + WAIT_S
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"mlflow ui did not start: {(root / 'mlflow_ui.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and the workers it started
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def _shot(driver, tmp_path: Path, name: str, full_page: bool = False) -> Path:
    path = tmp_path / name
    if full_page:  # the whole page, beyond the window (Chrome DevTools Protocol)
        data = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))
    else:
        driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, path
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENS / name)
    return path


def _wait_text(driver, text: str, timeout: float = WAIT_S):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    xpath = f"//*[contains(normalize-space(text()), {_xpath_literal(text)})]"
    return WebDriverWait(driver, timeout).until(EC.visibility_of_element_located((By.XPATH, xpath)))


def _xpath_literal(s: str) -> str:
    return f"'{s}'" if "'" not in s else "concat('" + "', \"'\", '".join(s.split("'")) + "')"


def test_html_report_shows_tables_and_plots(browser, reported, tmp_path):
    _, _, rep = reported
    browser.get((rep.out / "report.html").as_uri())
    _wait_text(browser, "What is missing")
    _wait_text(browser, "no baseline (method=none) for model toy-b")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.dataset.name, i.complete, i.naturalWidth, i.naturalHeight])")
    names = {n for n, complete, w, h in images if complete and w > 0 and h > 0}
    assert {"accuracy_vs_bits.png", "iso_memory.png", "ppl_vs_accuracy.png", "difficulty_toy-a.png", "flips.png",
            "cost.png"} <= names, images
    assert len(browser.find_elements("css selector", "table")) >= 4
    _shot(browser, tmp_path, "report_html_top.png")
    _shot(browser, tmp_path, "report_html_full.png", full_page=True)


def test_mlflow_ui_lists_the_sweep_runs_and_the_report_run(browser, reported, mlflow_ui, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    _, store, rep = reported
    # the runs table of the sweep (the "Model training" view; a fresh browser opens MLflow 3 on its GenAI view)
    flt = urllib.parse.quote("tags.`qllm.sweep_id` = 'S1'")
    browser.get(f"{mlflow_ui}/#/experiments/{store.exp}/runs?workflowType=machine_learning&searchFilter={flt}")
    parent = _wait_text(browser, "sweep S1")
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):  # the assistant panel
        if close.is_displayed():
            close.click()
    row = parent.find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
    row.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()  # expand
    for name in ("toy-a · none · bfloat16 · mini", "toy-a · rtn · w4 · mini", "toy-a · gptq · w8 · mini",
                 "toy-a · awq · w4 · mini", "toy-b · gptq · w4 · arc_only", "report · sweep S1"):
        _wait_text(browser, name)
    _shot(browser, tmp_path, "mlflow_runs.png")

    # the report run's artifacts: report.html previewed inside MLflow (an iframe), with its plots
    browser.get(f"{mlflow_ui}/#/experiments/{store.exp}/runs/{rep.run_id}/artifacts?workflowType=machine_learning")
    _wait_text(browser, "covered_runs.json")
    _wait_text(browser, "report.html").click()
    frame = WebDriverWait(browser, WAIT_S).until(EC.presence_of_element_located((By.TAG_NAME, "iframe")))
    browser.switch_to.frame(frame)
    try:
        _wait_text(browser, "What is missing")
        assert browser.execute_script("return Array.from(document.images).filter(i => i.naturalWidth > 0).length") >= 6
    finally:
        browser.switch_to.default_content()
    _shot(browser, tmp_path, "mlflow_report_run_artifacts.png")

    # the compare view lines the cells up by the same param and metric names
    ids = [store.ids[k] for k in (("none", "none"), ("rtn", "4"), ("gptq", "4"))]
    runs = urllib.parse.quote("[" + ",".join(f'"{i}"' for i in ids) + "]")
    browser.get(f"{mlflow_ui}/#/compare-runs?runs={runs}&experiments=[\"{store.exp}\"]"
                "&workflowType=machine_learning")
    _wait_text(browser, "toy-a · rtn · w4 · mini")
    _wait_text(browser, "arc_x/acc_norm")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", _wait_text(browser, "arc_x.limit"))
    _wait_text(browser, "qllm.cell_key")
    _shot(browser, tmp_path, "mlflow_compare.png")
