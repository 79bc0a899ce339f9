"""Drives Ferry's Lambda Invoke API with boto3; prints what each call answered as JSON.

Run by cli/tests/lambda.rs with ENDPOINT, AKID/SECRET (a tenant with functions hello,
loud, fails) and TIGHT_AKID/TIGHT_SECRET (a tenant limited to one call at a time).
"""
import base64
import json
import os

import boto3
import botocore
from botocore.config import Config

CFG = Config(region_name="us-east-1", retries={"total_max_attempts": 1})


def client(akid, secret):
    return boto3.client(
        "lambda",
        endpoint_url=os.environ["ENDPOINT"],
        aws_access_key_id=akid,
        aws_secret_access_key=secret,
        config=CFG,
    )


def refusal(call):
    try:
        call()
        return None
    except botocore.exceptions.ClientError as e:
        return {
            "code": e.response["Error"]["Code"],
            "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
            "reason": e.response.get("Reason"),
            "retry_after": e.response["ResponseMetadata"]["HTTPHeaders"].get("retry-after"),
        }


c = client(os.environ["AKID"], os.environ["SECRET"])
out = {}

r = c.invoke(FunctionName="hello", Payload=json.dumps({"name": "ada"}))
out["request_response"] = {
    "status": r["StatusCode"],
    "version": r.get("ExecutedVersion"),
    "payload": json.loads(r["Payload"].read()),
    "function_error": r.get("FunctionError"),
}
r = c.invoke(FunctionName="hello", Qualifier="1", Payload=b"{}")
out["qualified"] = {"status": r["StatusCode"], "version": r.get("ExecutedVersion")}
r = c.invoke(FunctionName="hello", InvocationType="Event", Payload=b'{"name":"event"}')
out["event"] = {"status": r["StatusCode"], "payload": r["Payload"].read().decode()}
r = c.invoke(FunctionName="hello", InvocationType="DryRun")
out["dry_run"] = {"status": r["StatusCode"]}
r = c.invoke(FunctionName="loud", LogType="Tail", Payload=b"{}")
out["tail"] = {
    "status": r["StatusCode"],
    "log": base64.b64decode(r.get("LogResult", "")).decode(errors="replace"),
    "payload": json.loads(r["Payload"].read()),
}
r = c.invoke(FunctionName="fails", Payload=b"{}")
out["function_error"] = {
    "status": r["StatusCode"],
    "function_error": r.get("FunctionError"),
    "payload": json.loads(r["Payload"].read()),
    "version": r.get("ExecutedVersion"),
}
out["not_found"] = refusal(lambda: c.invoke(FunctionName="nope", Payload=b"{}"))
out["dry_run_not_found"] = refusal(lambda: c.invoke(FunctionName="nope", InvocationType="DryRun"))
out["bad_json"] = refusal(lambda: c.invoke(FunctionName="hello", Payload=b"not json"))
big = json.dumps({"name": "x" * (2 << 20)})
out["too_large"] = refusal(lambda: c.invoke(FunctionName="hello", Payload=big))

tight = client(os.environ["TIGHT_AKID"], os.environ["TIGHT_SECRET"])
tight.invoke(FunctionName="hello", Payload=b"{}")
out["throttled"] = refusal(lambda: tight.invoke(FunctionName="hello", Payload=b"{}"))

forged = client(os.environ["AKID"], "0" * 64)
out["bad_signature"] = refusal(lambda: forged.invoke(FunctionName="hello", Payload=b"{}"))
stranger = client("FK0000000000000000000000000A", "0" * 64)
out["unknown_key"] = refusal(lambda: stranger.invoke(FunctionName="hello", Payload=b"{}"))

print(json.dumps(out))
