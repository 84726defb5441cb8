"""An independent SMTP client for sandbox/tests/smtp.rs: Python's smtplib with STARTTLS (or implicit TLS) and
AUTH XOAUTH2, trusting only the sandbox CA. Takes one JSON argument, prints one JSON object.

Arguments: host, port, ca, user, token, mode ("starttls" | "implicit"), continuation (bool: send XOAUTH2 after
"334 " instead of as an initial response), and optionally mail_from, rcpt_to (list), message_file.
"""

import base64
import json
import smtplib
import ssl
import sys


def main():
    args = json.loads(sys.argv[1])
    context = ssl.create_default_context(cafile=args["ca"])
    out = {}
    if args.get("mode") == "implicit":
        smtp = smtplib.SMTP_SSL(args["host"], args["port"], context=context, timeout=30)
        smtp.ehlo("client.sandbox.test")
        out["ehlo_tls"] = smtp.ehlo_resp.decode()
    else:
        smtp = smtplib.SMTP(args["host"], args["port"], timeout=30)
        smtp.ehlo("client.sandbox.test")
        out["ehlo_plain"] = smtp.ehlo_resp.decode()
        code, text = smtp.starttls(context=context)
        out["starttls"] = [code, text.decode()]
        smtp.ehlo("client.sandbox.test")
        out["ehlo_tls"] = smtp.ehlo_resp.decode()

    sasl = "user=%s\x01auth=Bearer %s\x01\x01" % (args["user"], args["token"])
    response = base64.b64encode(sasl.encode()).decode()
    if args.get("continuation"):
        code, text = smtp.docmd("AUTH", "XOAUTH2")
        out["auth_challenge"] = [code, text.decode()]
        code, text = smtp.docmd(response)
    else:
        code, text = smtp.docmd("AUTH", "XOAUTH2 " + response)
    out["auth"] = [code, text.decode()]

    if code == 235 and args.get("message_file"):
        with open(args["message_file"], "rb") as f:
            message = f.read()
        try:
            refused = smtp.sendmail(args["mail_from"], args["rcpt_to"], message)
            out["send"] = {"ok": True, "refused": {k: [v[0], v[1].decode()] for k, v in refused.items()}}
        except smtplib.SMTPResponseException as e:
            out["send"] = {"ok": False, "code": e.smtp_code, "text": e.smtp_error.decode()}
    try:
        code, text = smtp.quit()
        out["quit"] = [code, text.decode()]
    except smtplib.SMTPException:
        pass
    print(json.dumps(out))


if __name__ == "__main__":
    main()
