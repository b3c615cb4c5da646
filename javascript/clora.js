// Hover hints for the CLoRA accordions (txt2img and img2img).
(function () {
    const hints = {
        "clora-subject": "The subject phrase exactly as written in the prompt, e.g. 'cat'. For 'style (listed subjects)': the subjects, comma separated.",
        "clora-lora": "An installed LoRA. Choosing one fills the trigger words from its activation text.",
        "clora-weight": "Multiplier of the LoRA's UNet part.",
        "clora-te_weight": "Multiplier of the LoRA's text-encoder part, used while encoding its prompt variant.",
        "clora-trigger": "Words inserted right before the subject in this LoRA's prompt variant.",
        "clora-role": "content: acts inside its subject's mask. style (whole image): every variant, every pixel. style (listed subjects): only inside the listed subjects' masks.",
        "clora-step_size": "Latent update step size (paper: 20).",
        "clora-update_fraction": "Fraction of the steps that update the latent (paper: 0.5).",
        "clora-refine_at": "Steps with extra refine iterations, as fractions of the steps (paper: 0, 0.2, 0.4).",
        "clora-refine_iterations": "Extra latent updates at each refine step (paper: 20).",
        "clora-refine_tolerance": "Stop refining an image once its loss improves by less than this fraction (0: the paper's fixed count).",
        "clora-morphology": "Open or close the masks before fusion (paper: none).",
        "clora-mask_threshold": "A map pixel belongs to the mask when it reaches this fraction of the map's peak.",
        "clora-mask_start": "Fraction of the steps before masks are used; until then variants are averaged.",
        "clora-soft_edges_from": "From this fraction of the steps on, the masks get soft edges, which clean the grain hard seams leave (1: never).",
        "clora-keeps_means_from": "With this many content LoRAs or more, the latent update leaves each subject region's mean colour alone on its path through the other prompts' maps (0: never, the paper's update).",
        "clora-previews": "Append the attention maps and masks of each image to the gallery.",
    };
    onUiLoaded(function () {
        document.querySelectorAll("[id^='clora-']").forEach(function (el) {
            // clora-txt2img-lora-3 -> clora-lora
            const key = el.id.replace(/^clora-(txt2img|img2img)-/, "clora-").replace(/-\d+$/, "");
            if (hints[key]) {
                el.title = hints[key];
            }
        });
    });
})();
