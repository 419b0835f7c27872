"""The reference for genai bundles: onnxruntime-genai's own greedy generate loop."""

from __future__ import annotations


def genai_greedy(bundle_path, prompts_ids: list[list[int]], n: int) -> list[list[int]]:
    """Exactly ``n`` greedy tokens after each prompt (EOS does not stop it: min_length)."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle_path))
    out = []
    for ids in prompts_ids:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n,
                                  min_length=len(ids) + n)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        out.append([int(t) for t in gen.get_sequence(0)[len(ids):]])
    return out
