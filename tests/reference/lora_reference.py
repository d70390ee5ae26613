#!/usr/bin/env python3
"""Hugging Face peft references for gpt2kit's LoRA adapters (tests/lora.rs runs these
through GPT2KIT_PYTHON). Every mode loads the base with transformers'
GPT2LMHeadModel in fp32, eval mode (no dropout: the tests use lora_dropout 0).

  logits --base B --adapter A --ids 1,2,3 --out F
      the adapter loaded by PeftModel.from_pretrained: unmerged logits ("logits"),
      logits after merge_and_unload ("merged"), and the base's alone ("base").
  make --base B --out DIR --r R --alpha A --targets c_attn,c_proj --seed S
      an adapter made by peft (get_peft_model, its own init of A), its B drawn from
      N(0, 0.1²) so that the adapter changes the logits, saved by save_pretrained.
  step --base B --adapter A --ids 1,2,3;4,5,6 --labels ... --lr X --weight-decay X --out F
      one training step from the adapter as peft + torch.optim.AdamW (the Trainer's
      defaults for betas and eps, clip_grad_norm_ at 1.0) take it: the loss (mean over
      the target tokens), the gradient norm, and the adapter's tensors after the step
      by peft's saved names.
"""
import argparse
import json

import torch
from safetensors.torch import save_file


def base_model(path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path).float().eval()


def rows(text):
    return torch.tensor([[int(x) for x in r.split(",")] for r in text.split(";")])


def logits_mode(a):
    from peft import PeftModel

    ids = rows(a.ids)
    with torch.no_grad():
        plain = base_model(a.base)(ids).logits[0].contiguous()
        model = PeftModel.from_pretrained(base_model(a.base), a.adapter).eval()
        unmerged = model(ids).logits[0].contiguous()
        merged = model.merge_and_unload()(ids).logits[0].contiguous()
    save_file({"logits": unmerged, "merged": merged, "base": plain}, a.out)


def make_mode(a):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(a.seed)
    config = LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        target_modules=a.targets.split(","),
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base_model(a.base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(a.out)


def step_mode(a):
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(base_model(a.base), a.adapter, is_trainable=True)
    model.eval()  # no dropout
    ids, labels = rows(a.ids), rows(a.labels)
    params = [p for p in model.parameters() if p.requires_grad]
    # The Trainer decays every parameter but biases and layer norms: both LoRA matrices.
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    opt.step()
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, a.out, metadata={"loss": json.dumps(float(loss)), "grad_norm": json.dumps(norm)})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["logits", "make", "step"])
    p.add_argument("--base", required=True)
    p.add_argument("--adapter")
    p.add_argument("--out", required=True)
    p.add_argument("--ids")
    p.add_argument("--labels")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8)
    p.add_argument("--targets", default="c_attn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    a = p.parse_args()
    {"logits": logits_mode, "make": make_mode, "step": step_mode}[a.mode](a)


if __name__ == "__main__":
    main()
