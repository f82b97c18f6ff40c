"""Helpers the test layers share: tiny models, local-run set-up, `bism` subprocesses, Ray
Train worker functions, the local Ray cluster and the multi-node probe job."""
