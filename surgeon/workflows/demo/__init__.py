"""`surgeon demo`: the whole pipeline on the embedded pretrained model, with a shareable report."""
