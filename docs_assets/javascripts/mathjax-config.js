// MathJax 3 settings for the notebook pages. nbconvert leaves TeX between $...$ and $$...$$ in
// the page text, and MathJax 3 reads only \(...\) unless inlineMath says otherwise. This file
// must load before tex-chtml-full.js (mkdocs.yml lists them in that order).
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    // Code cells and outputs hold shell variables such as $MEDSEG_DATA, not TeX.
    ignoreHtmlClass: "jp-CodeMirrorEditor|jp-OutputArea-output|highlight|tex2jax_ignore",
    processHtmlClass: "jp-MarkdownOutput|tex2jax_process",
  },
  chtml: {
    fontURL: new URL("../mathjax/output/chtml/fonts/woff-v2", document.currentScript.src).href,
  },
};
