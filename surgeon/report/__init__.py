"""Pages and figures: data in, HTML or PNG out.

The one report layer every command that renders a page or a figure uses
(`surgeon demo`, `surgeon intruders --plot`, and the pages to come). It knows
nothing of checkpoints or workflows: callers hand it plain numbers and text.
"""
