"""The baseline for ``benchmarks.serving``: the same LightGBM model behind a bare ASGI app.

One uvicorn worker, Starlette, no auth, no validation models, no metrics, no logging: parse the
JSON body, look the account's row up in the online snapshot matrix, ``Booster.predict`` it.

    BARE_MODEL_FILE=... BARE_SNAPSHOT=... uvicorn benchmarks.serving_support.bare_app:app
"""

import os

import lightgbm as lgb
import pandas as pd
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from mlops.core.model_inputs import to_model_matrix

_frame = pd.read_parquet(os.environ["BARE_SNAPSHOT"])
INDEX = {account: i for i, account in enumerate(_frame["account_id"])}
FEATURES = to_model_matrix(_frame)
BOOSTER = lgb.Booster(model_file=os.environ["BARE_MODEL_FILE"])
del _frame


async def predict(request):
    body = await request.json()
    i = INDEX[body["account_id"]]
    score = float(BOOSTER.predict(FEATURES[i : i + 1], num_threads=1)[0])
    return JSONResponse({"account_id": body["account_id"], "score": score})


async def predict_batch(request):
    body = await request.json()
    rows = [INDEX[a] for a in body["account_ids"]]
    scores = BOOSTER.predict(FEATURES[rows], num_threads=1 if len(rows) < 512 else 0)
    return JSONResponse({"scores": scores.tolist()})


async def readyz(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[
    Route("/v1/predict", predict, methods=["POST"]),
    Route("/v1/predict_batch", predict_batch, methods=["POST"]),
    Route("/readyz", readyz),
])
