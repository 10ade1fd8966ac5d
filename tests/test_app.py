"""The Streamlit app on the edge runtime: AppTest for the flows, a real headless browser for one end to end."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, browser, needs_browser, run
from tests.test_edge import BLOCK_TF

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(ROOT / "edge" / "app.py")
PARASITIZED = sorted((ROOT / "examples" / "cells" / "Parasitized").glob("*.png"))
UNINFECTED = sorted((ROOT / "examples" / "cells" / "Uninfected").glob("*.png"))
FIELD = ROOT / "examples" / "field" / "IMG_20150614_124212.jpg"


def upload(path: Path, mime: str = "image/png"):
    return (path.name, path.read_bytes(), mime)


def started() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def texts(at) -> str:
    return "\n".join(m.value for m in [*at.markdown, *at.error, *at.warning, *at.info, *at.caption])


def test_research_note_and_the_installed_models_are_shown():
    at = started()
    assert "not a diagnosis" in at.warning[0].value
    options = at.selectbox(key="model").options
    assert {"cnn · tflite · int8", "mobilenetv2 · onnx · fp32"} <= set(options)
    folder, file = (ROOT / "models" / "default.txt").read_text().strip().split("/")  # e.g. cnn_s2/cnn_s2_int8.tflite
    variant = file.rsplit(".", 1)[0].rsplit("_", 1)[1]
    assert at.selectbox(key="model").value == f"{folder} · tflite · {variant}"  # the shipped default


def test_uploading_cells_shows_label_confidence_and_overlay():
    at = started()
    at.file_uploader(key="cells").set_value([upload(PARASITIZED[0]), upload(UNINFECTED[0])])
    at.run()
    assert not at.exception and not at.error
    md = texts(at)
    assert "### Parasitized" in md and "### Uninfected" in md and "threshold 0.5000" in md
    images = at.get("image")
    assert len(images) == 2 and [i.proto.imgs[0].caption for i in images] == [PARASITIZED[0].name, UNINFECTED[0].name]
    assert [r["label"] for r in at.dataframe[0].value.to_dict("records")] == ["Parasitized", "Uninfected"]


def test_threshold_change_flips_the_label_and_the_maps_class():
    at = started()
    at.file_uploader(key="cells").set_value([upload(UNINFECTED[1])])
    at.run()
    assert "evidence for **Uninfected**" in texts(at)
    at.selectbox(key="op").set_value("custom")
    at.run()
    slider = next(s for s in at.slider if s.key.endswith("-custom"))
    slider.set_value(0.001)
    at.run()
    md = texts(at)
    assert "### Parasitized" in md and "evidence for **Parasitized**" in md and "threshold 0.0010" in md


def test_switching_model_uses_that_models_card():
    at = started()
    at.selectbox(key="model").set_value("mobilenetv2 · onnx · int8")
    at.file_uploader(key="cells").set_value([upload(PARASITIZED[1])])
    at.run()
    assert "mobilenetv2_int8.onnx" in texts(at)
    assert at.dataframe[0].value.to_dict("records")[0]["label"] == "Parasitized"


@pytest.mark.parametrize("name,data,message", [
    ("notes.png", b"hello, not an image", "not an image"),
    ("cut.png", None, "truncated or corrupt"),
    ("field.jpg", "field", "use the Fields tab"),
    ("huge.png", "huge", "too large"),
])
def test_a_bad_upload_is_a_message_and_the_app_keeps_working(name, data, message):
    if data is None:
        data = PARASITIZED[0].read_bytes()[:300]
    elif data == "field":
        data = FIELD.read_bytes()
    elif data == "huge":  # 56 MP: over the decoder's pixel limit, though the file is small
        import io
        from PIL import Image
        buf = io.BytesIO()
        Image.new("L", (8000, 7000), 200).save(buf, format="PNG")
        data = buf.getvalue()
    at = started()
    at.file_uploader(key="cells").set_value([(name, data, "image/png"), upload(UNINFECTED[0])])
    at.run()
    assert not at.exception
    assert message in at.error[0].value
    assert "### Uninfected" in texts(at)  # the good upload beside it is still classified


def test_a_field_gives_counts_interval_and_the_report():
    at = started()
    assert at.selectbox(key="field-model").value == "mobilenetv2 · tflite · int8"  # models/default_field.txt
    at.file_uploader(key="fields").set_value([upload(FIELD, "image/jpeg")])
    at.run()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    n = int(metrics["Red cells counted"].split("/")[0])
    assert 150 <= n <= 400 and metrics["Red cells counted"].endswith("/ 2000")
    assert metrics["Parasitemia (corrected)"].endswith("%")
    assert "95% interval" in texts(at) and "Target of 2000 red cells not reached" in texts(at)
    fields = at.dataframe[0].value.to_dict("records")
    assert fields[0]["status"] == "ok" and fields[0]["red cells"] == n
    assert fields[0]["overlapped"].endswith("%")  # as the report shows it


def test_the_field_tab_counts_at_the_cards_screened_point_and_offers_the_others():
    at = started()
    sel = at.selectbox(key="field-op-mobilenetv2 · tflite · int8")
    assert sel.value == "counting-fast" and {"counting", "screening"} <= set(sel.options)
    assert "screened by cnn_s2_int8.tflite" in texts(at)
    at.selectbox(key="model").set_value("mobilenetv2 · tflite · int8").run()
    cell_points = at.selectbox(key="op").options  # the cell tab offers plain thresholds only
    card = json.loads((ROOT / "models" / "mobilenetv2" / "mobilenetv2_int8.tflite.card.json").read_text())
    assert f"counting ({card['operating_points']['counting']['threshold']:.4f})" in cell_points and not any(o.startswith("counting-fast") for o in cell_points)


def test_a_cell_sent_to_the_field_tab_is_refused():
    at = started()
    at.file_uploader(key="fields").set_value([upload(PARASITIZED[0])])
    at.run()
    assert not at.exception and "use the Cells tab" in at.error[0].value


def test_two_sessions_share_nothing():
    a, b = started(), started()
    a.file_uploader(key="cells").set_value([upload(PARASITIZED[0])])
    a.run()
    b.run()
    assert a.dataframe and not b.dataframe


def test_the_app_never_imports_tensorflow_or_keras():
    code = BLOCK_TF + f"""
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({APP!r}, default_timeout=120)
at.run()
at.file_uploader(key="cells").set_value([("c.png", open({str(PARASITIZED[0])!r}, "rb").read(), "image/png")])
at.run()
assert not at.exception, at.exception
bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]
assert not bad, bad
print("ok", at.dataframe[0].value.to_dict("records")[0]["label"])
"""
    res = run(["-c", code])
    assert res.returncode == 0 and res.stdout.strip().endswith("ok Parasitized"), res.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`malaria-edge app` on a free local port, as a user starts it."""
    import urllib.request
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "malaria_edge", "app", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the app did not start within 60 s")
    yield url
    proc.terminate()
    proc.wait(10)


@needs_browser
def test_in_a_real_browser_an_uploaded_cell_gets_its_prediction(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    driver = browser()
    try:
        t0 = time.time()
        driver.get(served)
        wait = WebDriverWait(driver, 60)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        first_paint = time.time() - t0
        driver.find_elements(By.CSS_SELECTOR, "input[type=file]")[0].send_keys(str(PARASITIZED[0]))
        wait.until(lambda d: "confidence" in d.find_element(By.TAG_NAME, "body").text)
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "Parasitized" in body and "threshold 0.5000" in body and "not a diagnosis" in body
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "img[src*='media']")))
        shot = Path(os.environ.get("APP_SCREENSHOT", tmp_path / "app.png"))
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"first paint {first_paint:.2f} s (browser start excluded)")
    finally:
        driver.quit()


@needs_browser
def test_in_a_real_browser_an_uploaded_field_photo_is_counted(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    from edge.field import FieldOptions, analyze
    from edge.images import load_image
    from edge.operating import field_point, operating_point
    from edge.runtime import default_model, load_classifier
    m = load_classifier(default_model("field"))
    res = analyze(load_image(FIELD), str(FIELD), m, FieldOptions.at(operating_point(m, field_point(m))))
    driver = browser(height=1660)
    try:
        driver.get(served)
        wait = WebDriverWait(driver, 120)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        next(t for t in driver.find_elements(By.CSS_SELECTOR, "[role=tab]") if t.text == "Fields").click()
        box = wait.until(lambda d: next((u for u in d.find_elements(By.CSS_SELECTOR, "[data-testid=stFileUploader]")
                                         if "Field photos" in u.text), None))  # its text shows once the tab is open
        box.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(FIELD))
        wait.until(lambda d: "Red cells counted" in d.find_element(By.TAG_NAME, "body").text)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "img[src*='media']")))
        body = driver.find_element(By.TAG_NAME, "body").text
        # the page shows what the library counts on the same photo at the field model's field point
        assert f"{res.rbc} / 2000" in body and "95% interval" in body and "not reached" in body
        called = {f"{FIELD.name} #{c.cell} P=" for c in res.cells if c.status == "ok" and c.label == "Parasitized"}
        assert len(called) == res.positive and all(c in body for c in called)  # the gallery: each positive cell
        shot = Path(os.environ.get("APP_FIELDS_SCREENSHOT", tmp_path / "fields.png"))
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_a_field_captured_from_the_microscope_camera_is_counted(monkeypatch, tmp_path):
    """The camera beside the app; a video file of the real field stands in for it (same capture code)."""
    import cv2
    from edge.images import load_image
    rgb = load_image(FIELD)
    frame = cv2.cvtColor(cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA),
                         cv2.COLOR_RGB2BGR)
    video = tmp_path / "microscope.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (frame.shape[1], frame.shape[0]))
    w.write(frame)
    w.release()
    monkeypatch.setenv("MALARIA_EDGE_CAMERA", str(video))
    at = started()
    at.button(key="capture").click()
    at.run()
    assert not at.exception and not at.error
    n = int({m.label: m.value for m in at.metric}["Red cells counted"].split("/")[0])
    assert 150 <= n <= 400
    assert at.dataframe[0].value.to_dict("records")[0]["field"] == "camera-001.png"


def test_an_unplugged_microscope_camera_is_a_message(monkeypatch):
    monkeypatch.setenv("MALARIA_EDGE_CAMERA", "57")
    at = started()
    at.button(key="capture").click()
    at.run()
    assert not at.exception and "camera 57 could not be opened" in at.error[0].value
