"""The dashboard in a real headless browser (Debian's chromium driven by Playwright) against
`squeeze serve` (embedded: SQLite, the filesystem broker, a real worker) with API keys on.

Screenshots of the finished job page, the compare view and the narrow form go to SQUEEZE_SCREENSHOT_DIR
(the README's pictures: `SQUEEZE_SCREENSHOT_DIR=docs/screenshots`), else to a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from app.settings import Settings
from tests.e2e.test_jobs import spec_for
from tests.services import Receiver, api_server, bearer, create_api_key

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("SQUEEZE_SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "squeeze-screenshots")
JOB_TIMEOUT_MS = 240_000

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, API key) of `squeeze serve` with its worker, auth on."""
    data_dir = tmp_path_factory.mktemp("dashboard")
    settings = Settings(data_dir=data_dir, auth="on", lease_seconds=20, broker_polling_interval=0.1)
    webhooks = {"SQUEEZE_WEBHOOK_ALLOW_PRIVATE": "true", "SQUEEZE_WEBHOOK_INTERVAL_SECONDS": "0.2",
                "SQUEEZE_WEBHOOK_BACKOFF_SECONDS": "0.2"}  # a loopback receiver, retried at once
    with api_server(settings, data_dir / "serve.log", env=webhooks) as base:
        yield base, create_api_key(settings, "tenant-ui")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A page on the dashboard with the API key given through its prompt; a script error fails the test."""
    base, key = server
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=base)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # HTTP errors the page expects (401 before the key, 422 from a bad form) are logged as failed loads.
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.goto("/")
    expect(page.locator("#authstate")).to_have_text("this server needs a valid API key")
    page.fill("#key", key)
    page.click("#keyform button")
    expect(page.locator("#authstate")).to_have_text("key in use")
    yield page
    context.close()
    assert not errors, errors


def fill_tiny_job(page: Page, model_dir: Path, calibration: Path, **fields: str) -> None:
    page.goto("/submit")
    page.fill("#f-model-id", str(model_dir))
    page.select_option("#f-quantization-method", "rtn")
    page.fill("#f-quantization-group_size", "32")
    page.set_input_files("#calibration-file", str(calibration))
    expect(page.locator("#upload-state")).to_contain_text("uploaded")
    page.fill("#f-calibration-num_samples", "8")
    page.fill("#f-calibration-seq_len", "32")
    page.fill("#f-evaluation-num_windows", "4")
    for selector, value in fields.items():
        page.fill(f"#f-{selector}", value)


def api_job(server, job_id: str) -> dict:
    base, key = server
    return httpx.get(f"{base}/v1/jobs/{job_id}", headers=bearer(key)).json()


def test_form_shows_the_spec_defaults_and_a_422_next_to_the_field(page):
    from app.jobs.spec import DEFAULT_GROUP_SIZE, Calibration, Compensation, Evaluation, Quantization

    page.goto("/submit")
    expect(page.locator("#f-quantization-group_size")).to_have_value(str(DEFAULT_GROUP_SIZE))
    expect(page.locator("#f-quantization-method")).to_have_value(Quantization.model_fields["method"].default)
    expect(page.locator("#f-calibration-seq_len")).to_have_value(str(Calibration.model_fields["seq_len"].default))
    expect(page.locator("#f-evaluation-num_windows")).to_have_value(str(Evaluation.model_fields["num_windows"].default))
    assert float(page.input_value("#f-compensation-damp")) == Compensation.model_fields["damp"].default
    assert Compensation.model_fields["adapter_bits"].default is None
    expect(page.locator("#f-compensation-adapter_bits")).to_have_value("")
    expect(page.locator("#f-compensation-rank")).to_be_hidden()  # compensation is off until ticked
    page.fill("#f-model-id", "org/model")
    page.fill("#f-calibration-dataset", "org/data")
    page.fill("#f-quantization-group_size", "100")
    page.click("#submit")
    problem = page.locator('[data-problem-for="quantization.group_size"]')
    expect(problem).to_contain_text("power of two")
    expect(page.locator('[data-problem-for="model.id"]')).to_have_text("")
    assert page.url.endswith("/submit")  # nothing was created

    page.set_viewport_size({"width": 380, "height": 900})
    page.fill("#f-model-id", "m" * 512)
    assert page.evaluate("document.documentElement.scrollWidth") <= 380
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "form-narrow.png", full_page=True)


def test_submit_watch_progress_finish_and_open_the_job_url(page, server, slow_llama_dir, calibration_txt):
    # The 12-layer model: its layers last several polls of the page (the 2-layer one is done in a blink).
    fill_tiny_job(page, slow_llama_dir, calibration_txt)
    page.check("#use-compensation")
    page.fill("#f-compensation-rank", "4")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]

    shown = []  # each percent the bar showed, in order
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while (status := page.locator("#job-status").text_content()) not in ("succeeded", "failed", "cancelled"):
        percent = float(page.locator("#progress-bar").get_attribute("aria-valuenow") or 0)
        if not shown or shown[-1] != percent:
            shown.append(percent)
        assert time.monotonic() < deadline, page.locator("#events").text_content()
        time.sleep(0.05)
    assert status == "succeeded", page.locator("#job-body").text_content()
    expect(page.locator("#progress-bar")).to_have_attribute("aria-valuenow", "100")
    assert len(set(shown) - {0.0, 100.0}) >= 2, f"the bar never showed progress between 0 and 100: {shown}"
    assert shown == sorted(shown), f"the bar went backwards: {shown}"

    job = api_job(server, job_id)
    expect(page.locator("#ppl-before")).to_have_text(f"{job['metrics']['perplexity_before']:.3f}")
    expect(page.locator("#ppl-after")).to_have_text(f"{job['metrics']['perplexity_after']:.3f}")
    per_module = job["metrics"]["compression"]["per_module"]
    assert page.locator("#module-chart svg circle.before").count() == len(per_module)
    assert page.locator("#module-chart svg circle.after").count() == len(per_module)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "job-succeeded.png", full_page=True)
    ranks = {m["rank"] for m in per_module.values()}
    expect(page.locator("#rank-summary")).to_contain_text(f"rank {max(ranks)}: ")
    page.click("#results details summary")
    expect(page.locator("#modules tbody tr")).to_have_count(len(per_module))
    first = next(iter(per_module))
    row = page.locator("#modules tbody tr").first
    expect(row.locator("td").nth(0)).to_have_text(first)
    expect(row.locator("td").nth(4)).to_have_text(str(per_module[first]["rank"]))
    sizes = page.locator("#sizes")
    adapter = job["metrics"]["adapter"]
    expect(sizes).to_contain_text(f"{adapter['params']:,} params")
    expect(sizes).to_contain_text("4-bit codes, groups of 32")
    size = job["metrics"]["size"]
    expect(sizes).to_contain_text(f"{size['bits_per_weight_stored']:.3f} bits per weight")
    expect(sizes).to_contain_text(f"{size['bits_per_weight_served']:.3f}")
    expect(page.locator("#artifacts")).to_contain_text(job["artifacts"]["uri"])
    expect(page.locator("#events")).to_contain_text("perplexity after")


    # The job's own URL, opened directly in a fresh tab (which asks for the key again: it is kept per tab).
    fresh = page.context.new_page()
    fresh.goto(f"/jobs/{job_id}")
    expect(fresh.locator("#authstate")).to_have_text("this server needs a valid API key")
    fresh.fill("#key", server[1])
    fresh.click("#keyform button")
    expect(fresh.locator("#job-status")).to_have_text("succeeded")
    expect(fresh.locator("#job-model")).to_have_text(str(slow_llama_dir))
    fresh.close()

    # "Submit again with changes" prefills the form with this job's spec.
    page.click("#resubmit")
    expect(page.locator("#f-model-id")).to_have_value(str(slow_llama_dir))
    expect(page.locator("#f-compensation-rank")).to_have_value("4")
    expect(page.locator("#f-calibration-dataset")).to_have_value(job["spec"]["calibration"]["dataset"])


def module_counts(values, label) -> str:
    """The job page's count summary (job.js countSummary): most common first, ties in order of appearance."""
    return "; ".join(f"{label(value)}: {n} module{'' if n == 1 else 's'}" for value, n in Counter(values).most_common())


def test_a_size_target_job_through_the_form_and_again_with_changes(page, server, tiny_llama_dir, calibration_txt):
    from app.jobs.spec import RankBudget

    fill_tiny_job(page, tiny_llama_dir, calibration_txt)
    page.check("#use-compensation")
    page.check("#use-target")
    page.fill("#f-target-bits_per_weight", "4")
    # The target chooses the bits and group sizes: the form stops sending them (the API refuses both at once).
    expect(page.locator("#f-quantization-bits")).to_have_value("")
    expect(page.locator("#f-quantization-group_size")).to_have_value("")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)

    job = api_job(server, page.url.rsplit("/", 1)[1])
    assert job["spec"]["target"] == {"bits_per_weight": 4.0, "engine": "transformers"}
    assert (job["spec"]["quantization"]["bits"], job["spec"]["quantization"]["group_size"]) == (None, None)
    metrics = job["metrics"]
    per_module, target, size = metrics["compression"]["per_module"], metrics["target"], metrics["size"]
    expect(page.locator("#bits-summary")).to_have_text(module_counts([m["bits"] for m in per_module.values()],
                                                                     lambda bits: f"{bits}-bit"))
    expect(page.locator("#rank-summary")).to_have_text(module_counts([m["rank"] for m in per_module.values()],
                                                                     lambda rank: f"rank {rank}"))
    page.click("#results details summary")
    rows = page.locator("#modules tbody tr")
    expect(rows.locator("td:nth-child(1)")).to_have_text(list(per_module))
    expect(rows.locator("td:nth-child(5)")).to_have_text([str(m["rank"]) for m in per_module.values()])
    expect(rows.locator("td:nth-child(7)")).to_have_text([str(m["bits"]) for m in per_module.values()])
    per_channel = {name for name, m in target["modules"].items() if m["group_size"] == -1}
    expect(rows.locator("td:nth-child(8)")).to_have_text(
        [f"{m['group_size']}{' (per channel)' if name in per_channel else ''}" for name, m in per_module.items()])
    # Each adapter's stored precision, chosen per Linear by the target: fp16 factors or group-wise codes.
    expect(rows.locator("td:nth-child(9)")).to_have_text(
        ["–" if not m["rank"] else "fp16" if m["adapter_bits"] is None else f"{m['adapter_bits']}-bit"
         for m in per_module.values()])
    adapted = [m["adapter_bits"] for m in per_module.values() if m["rank"]]
    assert adapted, "the 4-bit target gave no module an adapter: the adapter column went unchecked"
    expect(page.locator("#adapter-summary")).to_have_text(
        module_counts(adapted, lambda bits: "fp16 adapter" if bits is None else f"{bits}-bit adapter"))
    expect(page.locator("#target-summary")).to_contain_text(
        f"Size target: 4 bits per weight (engine transformers). The plan stores {target['planned_bits_per_weight']:.3f} "
        f"({target['planned_bytes']:,} of {target['budget_bytes']:,} bytes")
    expect(page.locator("#target-summary")).to_contain_text(
        f"counted from the artifact's files: {size['bits_per_weight_stored']:.3f}.")
    assert size["bits_per_weight_stored"] <= 4.0
    chosen = target["modules"].values()
    expect(page.locator("#sizes")).to_contain_text(
        "chosen per Linear by the size target: " + module_counts([m["bits"] for m in chosen], lambda b: f"{b}-bit")
        + "; " + module_counts([m["group_size"] for m in chosen],
                               lambda g: "per output channel" if g == -1 else f"groups of {g}"))

    # Again with changes: the target comes back (the bits still left to it) and a looser one is sent.
    page.click("#resubmit")
    expect(page.locator("#f-target-bits_per_weight")).to_have_value("4")
    expect(page.locator("#use-target")).to_be_checked()
    expect(page.locator("#f-quantization-bits")).to_have_value("")
    expect(page.locator("#f-quantization-group_size")).to_have_value("")
    expect(page.locator("#f-calibration-dataset")).to_have_value(job["spec"]["calibration"]["dataset"])
    # No rank budget in the job: its criterion select shows the schema's default, not a blank.
    expect(page.locator("#f-compensation-rank_budget-criterion")).to_have_value(
        RankBudget.model_fields["criterion"].default)
    page.fill("#f-target-bits_per_weight", "5")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    again = page.url.rsplit("/", 1)[1]
    assert again != job["id"]
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    spec = api_job(server, again)["spec"]
    assert spec["target"] == {"bits_per_weight": 5.0, "engine": "transformers"}
    assert {k: v for k, v in spec.items() if k != "target"} == {k: v for k, v in job["spec"].items() if k != "target"}


def test_target_and_webhook_problems_show_next_to_their_fields(page, server):
    base, key = server
    page.goto("/submit")
    page.fill("#f-model-id", "org/model")
    page.fill("#f-calibration-dataset", "org/data")
    page.check("#use-target")
    page.fill("#f-target-bits_per_weight", "20")
    page.click("#submit")
    expect(page.locator('[data-problem-for="target.bits_per_weight"]')).to_contain_text("less than or equal to 16")

    # Bits chosen by hand next to a target: the API names both, at the top of the form.
    page.fill("#f-target-bits_per_weight", "4")
    page.select_option("#f-quantization-bits", "4")
    page.click("#submit")
    expect(page.locator("#form-problem")).to_contain_text("target.bits_per_weight chooses quantization.bits")
    expect(page.locator('[data-problem-for="target.bits_per_weight"]')).to_have_text("")

    page.select_option("#f-quantization-bits", "")
    hook = "ftp://127.0.0.1/hook"  # refused whatever the server allows (its fixture admits loopback http)
    page.fill("#f-webhook_url", hook)
    page.click("#submit")
    refused = httpx.post(f"{base}/v1/jobs", headers=bearer(key), json={
        "model": {"id": "org/model"}, "quantization": {}, "target": {"bits_per_weight": 4},
        "calibration": {"dataset": "org/data"}, "webhook_url": hook})
    assert refused.status_code == 422 and refused.json()["fields"] == ["webhook_url"], refused.text
    expect(page.locator('[data-problem-for="webhook_url"]')).to_have_text(refused.json()["detail"])
    assert page.url.endswith("/submit")


def test_a_finished_job_shows_its_engines_downloads_its_files_and_lists_its_webhooks(page, server, tiny_llama_dir,
                                                                                   calibration_txt):
    base, key = server
    hook = Receiver([500, 200])  # the first POST is refused: two attempts, two rows
    try:
        spec = spec_for(tiny_llama_dir, calibration_txt, compensation={"method": "eora", "rank": 4},
                        webhook_url=hook.url)
        created = httpx.post(f"{base}/v1/jobs", json=spec, headers=bearer(key))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        page.goto(f"/jobs/{job_id}")
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)

        # The serving table is squeeze.json's, engine by engine.
        artifact = f"{base}/v1/jobs/{job_id}/artifacts"
        serving = httpx.get(f"{artifact}/squeeze.json", headers=bearer(key)).json()["serving"]
        assert api_job(server, job_id)["artifacts"]["serving"] == serving
        rows = page.locator("#serving tbody tr")
        expect(rows).to_have_count(len(serving))
        assert [rows.nth(i).get_attribute("data-engine") for i in range(len(serving))] == list(serving)
        assert set(serving) == {"transformers", "vllm", "peft"}
        vllm = page.locator('#serving tr[data-engine="vllm"] td')
        expect(vllm.nth(1)).to_have_text("yes" if serving["vllm"]["serves"] else "no")
        expect(vllm.nth(2)).to_have_text(f"yes (--enable-lora --max-lora-rank {serving['vllm']['lora']['max_lora_rank']})")
        expect(vllm.nth(3)).to_have_text(f"scheme: {serving['vllm']['scheme']}")
        peft = page.locator('#serving tr[data-engine="peft"] td')
        expect(peft.nth(1)).to_have_text("–")
        expect(peft.nth(2)).to_have_text(f"yes ({serving['peft']['adapter']}/)")

        # A file link downloads the API's bytes (binary, in a subfolder), fetched with the key.
        page.click("#files summary")
        with page.expect_download() as downloaded:
            page.click('#files a[data-path="adapter/adapter_model.safetensors"]')
        assert downloaded.value.suggested_filename == "adapter_model.safetensors"
        expected = httpx.get(f"{artifact}/adapter/adapter_model.safetensors", headers=bearer(key)).content
        assert len(expected) > 1000 and Path(downloaded.value.path()).read_bytes() == expected
        assert page.url.endswith(f"/jobs/{job_id}")  # the click downloaded; the app did not route to the file's URL

        # Each delivery attempt is a row: the refused one, then the accepted one.
        hook.wait_for(2)
        rows = page.locator("#deliveries tbody tr")
        expect(rows).to_have_count(2, timeout=20_000)
        expect(rows.nth(1).locator("td").nth(1)).to_have_text("delivered", timeout=20_000)
        delivery, = httpx.get(f"{base}/v1/jobs/{job_id}/webhooks", headers=bearer(key)).json()["items"]
        assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]
        for row, attempt in zip((rows.nth(0), rows.nth(1)), delivery["attempts"], strict=True):
            expect(row.locator("td")).to_have_text(["job.succeeded", "delivered", str(attempt["attempt"]),
                                                    f"HTTP {attempt['status_code']}", re.compile(r"\d")])
        expect(page.locator("#webhooks")).not_to_contain_text("token=abc")  # the URL's query is not shown
    finally:
        hook.close()


def test_cancel_a_running_job(page, server, slow_llama_dir, calibration_txt):
    fill_tiny_job(page, slow_llama_dir, calibration_txt)
    page.select_option("#f-quantization-method", "gptq")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    expect(page.locator("#job-status")).to_have_text("running", timeout=60_000)
    expect(page.locator("#progress-text")).to_contain_text(re.compile(r"layer \d+ of 12"), timeout=60_000)
    page.click("#cancel")
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=60_000)
    assert api_job(server, page.url.rsplit("/", 1)[1])["status"] == "cancelled"
    expect(page.locator("#cancel")).to_have_count(0)


def test_list_filters_searches_and_survives_a_long_model_id_and_a_failure(page, server):
    base, key = server
    long_id = "org/" + "x" * 508
    spec = {"model": {"id": long_id}, "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
            "calibration": {"dataset": "org/data"}}
    created = httpx.post(f"{base}/v1/jobs", json=spec, headers=bearer(key))
    assert created.status_code == 201, created.text
    page.set_viewport_size({"width": 360, "height": 800})
    page.goto("/")
    page.fill("#model-search", "xxxxxxxx")
    expect(page.locator("#jobs a.job")).to_have_count(1)
    expect(page.locator("#jobs a.job .model")).to_have_text(long_id)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.select_option("#status-filter", "succeeded")
    expect(page.locator("#list-message")).to_have_text("No jobs match.")

    # Its page: the model cannot be fetched (no hub here), and the failure reads as a sentence.
    page.goto(f"/jobs/{created.json()['id']}")
    expect(page.locator("#job-status")).to_have_text("failed", timeout=120_000)
    failure = page.locator("#failure")
    expect(failure).to_contain_text("This job failed")
    expect(failure).to_contain_text(api_job(server, created.json()["id"])["error"])
    assert page.evaluate("document.documentElement.scrollWidth") <= 360


def test_compare_two_finished_jobs(page, server, tiny_llama_dir, calibration_txt, tmp_path):
    base, key = server
    # A model id of its own: the compare view shows every finished job of a model, and the other tests'
    # jobs on the tiny model (a size target among them) would decide the Pareto front otherwise.
    model_dir = tmp_path / "compare-tiny-llama"
    shutil.copytree(tiny_llama_dir, model_dir)
    ids = []
    for bits in (4, 8):
        spec = {"model": {"id": str(model_dir)}, "quantization": {"method": "rtn", "bits": bits, "group_size": 32},
                "calibration": {"dataset": str(calibration_txt), "num_samples": 8, "seq_len": 32},
                "evaluation": {"num_windows": 4}}
        ids.append(httpx.post(f"{base}/v1/jobs", json=spec, headers=bearer(key)).json()["id"])
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while (jobs := [api_job(server, i) for i in ids]) and any(j["status"] not in ("succeeded", "failed") for j in jobs):
        assert time.monotonic() < deadline, jobs
        time.sleep(0.5)
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    ppl = {j["id"]: j["metrics"]["perplexity_after"] for j in jobs}

    page.goto(f"/compare?model={model_dir}")
    table = page.locator("#compare-table")
    for job_id in ids:
        expect(table.locator(f'tr[data-job="{job_id}"]')).to_have_count(1)
        expect(page.locator(f'#pareto-chart circle[data-job="{job_id}"]')).to_have_count(1)
    # 8-bit weights are larger: on the front only when its perplexity is lower than the 4-bit job's.
    four, eight = ids
    bits = {j["id"]: j["metrics"]["size"]["bits_per_weight_stored"] for j in jobs}
    assert bits[four] < bits[eight]
    for job_id in ids:
        expect(table.locator(f'tr[data-job="{job_id}"] td').nth(2)).to_have_text(f"{bits[job_id]:.3f}")
    expect(table.locator(f'tr[data-job="{four}"] td').last).to_have_text("yes")
    expect(table.locator(f'tr[data-job="{eight}"] td').last).to_have_text("yes" if ppl[eight] < ppl[four] else "no")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "compare.png", full_page=True)


def test_queue_panel_counts_this_tenants_jobs(page, server):
    base, key = server
    stats = httpx.get(f"{base}/v1/stats", headers=bearer(key)).json()
    expect(page.locator("#queued")).to_have_text(str(stats["queued"]), timeout=20_000)  # polled with backoff
    assert stats["workers_recent"], "a worker ran jobs for this tenant in the last minutes"
    expect(page.locator("#workernames")).to_contain_text(stats["workers_recent"][0])



def test_list_polls_ask_again_with_the_etag(page, server):
    """The browser keeps each answer and revalidates it: every poll after the first sends the tag of the
    answer before it (the server then answers 304 while the list is unchanged)."""
    polls = []
    page.on("requestfinished", lambda request: polls.append(request) if "/v1/job-search" in request.url else None)
    page.goto("/")
    deadline = time.monotonic() + 30
    while len(polls) < 3 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert len(polls) >= 3 and len({poll.url for poll in polls}) == 1
    tags = [poll.response().headers["etag"] for poll in polls]
    assert [poll.all_headers().get("if-none-match") for poll in polls[1:]] == tags[:-1]
