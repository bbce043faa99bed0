"""Screenshot of the web page after it made one identity's video: `docs/serving-page.png`.

    make demo && .venv/bin/pv-ray serve --store out/personalize &
    .venv/bin/python jobs/page_screenshot.py --url http://127.0.0.1:8000 --identity tom-hanks \
        --out docs/serving-page.png

Drives Debian's Chromium (`make browser`) through Selenium as a person would: pick the identity,
type the prompt, press Generate, wait for the video to play, and save the window.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--prompt", default="a person walking on a beach at sunset")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pv-ray-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}", "--window-size=1100,760"):  # fmt: skip
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"{args.url}/")
            wait = WebDriverWait(driver, 600)
            button = (By.CSS_SELECTOR, f'#identities button[data-identity="{args.identity}"]')
            wait.until(expected_conditions.element_to_be_clickable(button)).click()
            wait.until(lambda d: d.find_element(By.ID, "frames").get_attribute("value"))  # the server's defaults
            driver.find_element(By.ID, "prompt").send_keys(args.prompt)
            driver.find_element(By.ID, "generate").click()
            wait.until(
                lambda d: d.execute_script(
                    "const v = document.getElementById('video'); return !v.hidden && v.readyState >= 2"
                )
            )
            time.sleep(1)  # a frame past the first, so the still is not the video's blank start
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
