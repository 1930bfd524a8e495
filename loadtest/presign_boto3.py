#!/usr/bin/env python3
"""boto3's generate_presigned_url (what Label Studio uses), timed on one core, for comparison
with `loadtest sign`. Same bucket, key shape, expiry and credentials; no network.

    python3 loadtest/presign_boto3.py --count 100000 [--batch 300]

Prints one JSON line like loadtest's.
"""
import argparse
import json
import time

import boto3
from botocore.config import Config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9000",
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    batches = args.count // args.batch
    latencies = []
    started = time.perf_counter()
    for b in range(batches):
        begun = time.perf_counter()
        for i in range(args.batch):
            client.generate_presigned_url(
                "get_object",
                Params={"Bucket": "items", "Key": f"t0/seq-1/frames/{b * args.batch + i:06}.pcd"},
                ExpiresIn=300,
            )
        latencies.append(time.perf_counter() - begun)
    secs = time.perf_counter() - started
    latencies.sort()
    pct = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2)
    print(json.dumps({
        "scenario": "sign",
        "target": f"boto3 {boto3.__version__} generate_presigned_url, batch={args.batch}, 1 core",
        "operations": batches,
        "duration_s": round(secs, 2),
        "urls_per_sec": round(batches * args.batch / secs),
        "latency": {"p50_ms": pct(0.5), "p99_ms": pct(0.99)},
    }))


if __name__ == "__main__":
    main()
