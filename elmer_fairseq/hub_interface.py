"""Python API: ``ELMER.from_pretrained(...)`` and ``generate([...])``, on fairseq's hub utilities.

    from elmer_fairseq import ELMER
    m = ELMER.from_pretrained("checkpoints/demo", checkpoint_file="checkpoint_best.pt",
                              data_name_or_path="data-bin/sample",
                              bpe="sentencepiece", sentencepiece_model="data-bin/sample/spm.model")
    m.generate(["Return the number of bytes written."], exit_threshold=0.5)

Checkpoints load through fairseq's ``checkpoint_utils``, so with ``torch.load(weights_only=True)``
and the plugin's allow-list; ``ELMER.from_pretrained(OUT_DIR)`` on an ``elmer-export`` directory reads
no pickle at all (``export.py``). ``m.cuda()`` / ``m.half()`` move the model like any nn.Module.
"""

import os
from typing import List, Optional, Union

from fairseq import hub_utils, utils
from fairseq.hub_utils import GeneratorHubInterface

from . import export



def _as_text(sentence, index: int) -> str:
    if isinstance(sentence, str):
        return sentence
    if isinstance(sentence, (bytes, bytearray)):
        try:
            return bytes(sentence).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"sentence {index} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    raise TypeError(f"sentence {index} must be str or UTF-8 bytes, got {type(sentence).__name__}")


class ELMER(GeneratorHubInterface):
    """A loaded ``elmer_nat`` checkpoint with its dictionary, BPE and tokenizer."""

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        checkpoint_file: str = "checkpoint_best.pt",
        data_name_or_path: str = ".",
        bpe: Optional[str] = None,
        **kwargs,
    ) -> "ELMER":
        if os.path.isfile(os.path.join(model_name_or_path, export.CONFIG)):
            # an elmer-export directory: JSON, text and safetensors, no pickle
            if kwargs or bpe is not None:
                raise ValueError(f"{model_name_or_path} is an elmer-export directory: it brings its own BPE and "
                                 f"options; got {sorted(kwargs) + (['bpe'] if bpe else [])}")
            cfg, task, model = export.load_exported(model_name_or_path)
            return cls(cfg, task, [model])
        if bpe is not None:
            kwargs["bpe"] = bpe
        loaded = hub_utils.from_pretrained(model_name_or_path, checkpoint_file, data_name_or_path, **kwargs)
        return cls(loaded["args"], loaded["task"], loaded["models"])

    def generate(
        self,
        sentences: Union[str, bytes, List[Union[str, bytes]]],
        exit_threshold: Optional[float] = None,
        collapse_repeats: bool = False,
        return_exit_layers: bool = False,
        length_rule: Optional[str] = None,
    ):
        """Generate for one sentence or a list, batched; returns strings in input order.

        ``exit_threshold``: hard early exit δ (Eq. 10); None: the checkpoint's strategy; 0: last layer.
        ``length_rule``: as ``--length-rule`` (None: the task's). The generator is the task's
        (``task.build_generator``), so every other generation option is the task's too.
        With ``return_exit_layers``, each result is ``(text, [exit layer per token, </s> included])``.
        """
        single = isinstance(sentences, (str, bytes, bytearray))
        texts = [_as_text(s, i) for i, s in enumerate([sentences] if single else sentences)]
        overrides = {"exit_threshold": exit_threshold, "collapse": collapse_repeats, "length_rule": length_rule}
        generator = self.task.build_generator(
            self.models, None, extra_gen_cls_kwargs={k: v for k, v in overrides.items() if v is not None}
        )
        results = [None] * len(texts)
        for batch in self._build_batches([self.encode(t) for t in texts], skip_invalid_size_inputs=False):
            batch = utils.apply_to_sample(lambda t: t.to(self.device), batch)
            hypos = self.task.inference_step(generator, self.models, batch)
            for sample_id, nbest in zip(batch["id"].tolist(), hypos):
                results[sample_id] = nbest[0]
        outputs = []
        for hypo in results:
            text = self.decode(hypo["tokens"])
            outputs.append((text, hypo["exit_layers"].tolist()) if return_exit_layers else text)
        return outputs[0] if single else outputs

    translate = generate
    sample = generate
