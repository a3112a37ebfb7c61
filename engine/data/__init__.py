"""The data tools: analyze, audit, find-long, split."""
