#!/usr/bin/env python3
"""Drives headless Chromium through the DevTools protocol over a pipe (no network of
its own, no WebSocket library): runs a plan of steps against a page and prints what
the plan asked to read, as JSON.

    browser.py CHROMIUM PLAN.json

A plan is a list of steps:
    {"navigate": URL}
    {"wait": JS-EXPRESSION, "timeout": SECONDS}     until it is truthy
    {"read": JS-EXPRESSION, "as": NAME}            its value goes to the output
    {"click": CSS-SELECTOR}
    {"type": CSS-SELECTOR, "text": TEXT}
    {"sleep": SECONDS}
    {"screenshot": PATH}
    {"viewport": [WIDTH, HEIGHT]}                  a phone is [390, 844] (mobile emulation)
    {"shell": COMMAND}                             runs it (to kill the host under the page)
A failed wait stops the plan: the output then has "failed" (which step) and "page"
(the page's text), and the exit status is 1. The output's "errors" lists what the page
reported as an error: uncaught exceptions, console.error calls, and log entries of level
error (a refused script or style, a failed request), each with its source.
"""
import base64, json, os, subprocess, sys, tempfile, time

class Browser:
    def __init__(self, chromium):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        def plumb():
            # Copies first: dup2 onto the same number would keep close-on-exec.
            reading, writing = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(reading, 3)
            os.dup2(writing, 4)
        self.profile = tempfile.mkdtemp(prefix="iofilter-chromium-")
        self.process = subprocess.Popen(
            [chromium, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             "--window-size=1400,1000", f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=plumb, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer = b""
        self.next_id = 0
        self.session = None
        self.errors = []
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Log.enable")

    def call(self, method, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            self.note(answer)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def note(self, message):
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append({"source": "exception", "text": details.get("exception", {}).get("description") or details.get("text")})
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append({"source": "console", "text": " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", []))})
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append({"source": entry.get("source"), "text": entry.get("text"), "url": entry.get("url")})

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('exception', {}).get('description', result['exceptionDetails'])}")
        return result["result"].get("value")

    def close(self):
        self.process.kill()
        self.process.wait()
        subprocess.run(["rm", "-rf", self.profile])

def main():
    chromium, plan_path = sys.argv[1], sys.argv[2]
    plan = json.load(open(plan_path))
    browser = Browser(chromium)
    output = {}
    status = 0
    try:
        for index, step in enumerate(plan):
            if "navigate" in step:
                browser.call("Page.navigate", url=step["navigate"])
                time.sleep(0.3)
            elif "wait" in step:
                deadline = time.time() + step.get("timeout", 10)
                while not browser.evaluate(f"Boolean({step['wait']})"):
                    if time.time() > deadline:
                        output["failed"] = {"step": index, "wait": step["wait"]}
                        output["page"] = browser.evaluate("document.body.innerText")
                        status = 1
                        return
                    time.sleep(0.1)
            elif "read" in step:
                output[step["as"]] = browser.evaluate(step["read"])
            elif "click" in step:
                browser.evaluate(f"document.querySelector({json.dumps(step['click'])}).click()")
            elif "type" in step:
                selector = json.dumps(step["type"])
                browser.evaluate(f"(() => {{ const e = document.querySelector({selector}); e.value = {json.dumps(step['text'])}; e.dispatchEvent(new Event('input')); }})()")
            elif "sleep" in step:
                time.sleep(step["sleep"])
            elif "viewport" in step:
                width, height = step["viewport"]
                browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=width < 700)
                time.sleep(0.3)
            elif "shell" in step:
                subprocess.run(["/bin/sh", "-c", step["shell"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            elif "screenshot" in step:
                data = browser.call("Page.captureScreenshot", format="png")["data"]
                with open(step["screenshot"], "wb") as file:
                    file.write(base64.b64decode(data))
    finally:
        output["errors"] = browser.errors
        browser.close()
        print(json.dumps(output))
        sys.exit(status)

main()
