"""The three documented ways to load a converted folder, each with device_map="auto"."""

import transformers

import smile_stream


def remote_code(out):
    return transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, device_map="auto")


def accelerate_dispatch(out):
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    config = transformers.AutoConfig.from_pretrained(str(out))
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    return load_checkpoint_and_dispatch(model, str(out), device_map="auto", no_split_module_classes=model._no_split_modules)


LOADERS = {
    "remote_code": remote_code,
    "load_model": lambda out: smile_stream.load_model(out, device_map="auto"),
    "accelerate": accelerate_dispatch,
}
