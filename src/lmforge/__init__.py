"""lmforge: load, generate with, fine-tune, distil and train transformer language models.

    import lmforge
    model = lmforge.load_model("smollm2-135m-instruct")
    tok = lmforge.Tokenizer.for_model("smollm2-135m-instruct")
    print(lmforge.generate(model, tok, "Men on the moon", max_new_tokens=20))
    vectors = lmforge.embed("all-minilm-l6-v2", ["A man is eating food."])  # (1, 384) sentence embeddings

Distributed training lives in `lmforge.parallel` (`import lmforge.parallel as hvd`).
"""

from lmforge.config import ModelConfig
from lmforge.distill import DistillObjective, init_student
from lmforge.embeddings import SentenceEncoder, embed
from lmforge.generation import generate, generate_ids, stream
from lmforge.io import describe_checkpoint, load_config, load_model, save_model
from lmforge.labelled import load_splits
from lmforge.models import Decoder, Encoder, KVCache, ModelOutput, build_model
from lmforge.objectives import CausalLM, Classification, MaskedLM, Regression
from lmforge.predict import predict
from lmforge.tokenizer import Tokenizer
from lmforge.training import TrainConfig, TrainResult, evaluate, plot_run, train

__all__ = [
    "CausalLM",
    "Classification",
    "Decoder",
    "DistillObjective",
    "Encoder",
    "KVCache",
    "MaskedLM",
    "ModelConfig",
    "ModelOutput",
    "Regression",
    "SentenceEncoder",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "describe_checkpoint",
    "embed",
    "evaluate",
    "generate",
    "generate_ids",
    "init_student",
    "load_config",
    "load_model",
    "load_splits",
    "plot_run",
    "predict",
    "save_model",
    "stream",
    "train",
]
