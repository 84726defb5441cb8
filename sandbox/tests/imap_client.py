"""An independent IMAP client for the sandbox's tests: Python's imaplib, not our code.

Reads a JSON request on stdin and prints one JSON result per case on stdout:

    {"ca": "<CA PEM>", "host": "127.0.0.2",
     "cases": [{"port": 993, "tls": "implicit" | "starttls" | "none", "mech": "XOAUTH2" | "OAUTHBEARER",
                "user": "support@contoso.com", "token": "...", "select": true, "fetch": 1}]}

Per case: {"ok": bool, "error": str|null, "ms": float (connect to auth answer), "caps": [...] (before auth),
"exists": int|null, "body": str|null (BODY.PEEK[] of message `fetch`), "folders": [...]}.
`tls: "none"` tries to authenticate on the plain port without STARTTLS.
"""

import imaplib
import json
import ssl
import sys
import time


def sasl(case):
    user, token = case["user"], case["token"]
    if case.get("mech", "XOAUTH2") == "OAUTHBEARER":
        return f"n,a={user},\x01host=127.0.0.2\x01port={case['port']}\x01auth=Bearer {token}\x01\x01".encode()
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def run(case, ctx, host):
    result = {"ok": False, "error": None, "ms": None, "caps": [], "exists": None, "body": None, "folders": []}
    started = time.monotonic()
    if case["tls"] == "implicit":
        conn = imaplib.IMAP4_SSL(host, case["port"], ssl_context=ctx, timeout=20)
    else:
        conn = imaplib.IMAP4(host, case["port"], timeout=20)
        result["plain_caps"] = list(conn.capabilities)
        if case["tls"] == "starttls":
            conn.starttls(ssl_context=ctx)
    result["caps"] = list(conn.capabilities)
    response = sasl(case)
    # The first continuation is empty: send the response. A failure first gets a `+ <base64 JSON>` challenge,
    # which must be answered with an empty line before the tagged NO arrives.
    try:
        conn.authenticate(case.get("mech", "XOAUTH2"), lambda challenge: b"" if challenge else response)
        result["ok"] = True
    except (imaplib.IMAP4.error, imaplib.IMAP4.abort) as e:
        result["error"] = str(e)
    result["ms"] = (time.monotonic() - started) * 1000.0
    if result["ok"]:
        if case.get("select"):
            typ, data = conn.select("INBOX")
            result["exists"] = int(data[0]) if typ == "OK" else None
            if case.get("fetch"):
                typ, data = conn.fetch(str(case["fetch"]), "(BODY.PEEK[])")
                if typ == "OK" and data and isinstance(data[0], tuple):
                    result["body"] = data[0][1].decode("utf-8", "replace")
        typ, data = conn.list()
        result["folders"] = [d.decode() for d in data or [] if d]
        conn.logout()
    else:
        try:
            conn.logout()
        except Exception:
            pass
    return result


def main():
    request = json.load(sys.stdin)
    ctx = ssl.create_default_context(cafile=request["ca"])
    host = request.get("host", "127.0.0.2")
    results = []
    for case in request["cases"]:
        try:
            results.append(run(case, ctx, host))
        except Exception as e:  # a crash is a result too: the test shows it
            results.append({"ok": False, "error": f"client error: {type(e).__name__}: {e}", "ms": None})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
